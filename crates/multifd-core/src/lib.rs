//! The data plane of `multifd`: QEMU-compatible multifd wire codec, RAM blocks, page bitmaps,
//! zero-page detection, and the source and destination channel threads. Pure Rust with no
//! N-API, so everything here is tested with `cargo test` and can be fuzzed; `multifd-node`
//! only binds it to JavaScript.

pub mod bitmap;
pub mod compress;
pub mod block;
pub mod control;
pub mod control_link;
pub mod control_messages;
pub mod dest;
pub mod error;
mod hex;
pub mod integrity;
pub mod io;
pub mod journal;
pub mod lifecycle;
pub mod limits;
pub mod mapped_ram;
pub mod output_dir;
pub mod memory;
pub mod protocol;
pub mod qemu_file;
pub mod qemu_file_writer;
pub mod qemu_peer;
pub mod qemu_stream;
pub mod resume;
pub mod rejections;
pub mod session;
pub mod snapshot;
pub mod source;
pub mod stream;
pub mod throttle;
pub mod tls;
pub mod transport;
pub mod wire;
pub mod zerocopy;

pub use error::{Error, ErrorCode, Result};
