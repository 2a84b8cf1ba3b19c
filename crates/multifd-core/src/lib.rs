//! The data plane of `multifd`: QEMU-compatible multifd wire codec, page bitmaps and zero-page
//! detection. Pure Rust with no N-API, so everything here is tested with `cargo test` and can
//! be fuzzed; `multifd-node` only binds it to JavaScript.

pub mod bitmap;
pub mod error;
mod hex;
pub mod wire;
pub mod zero;

pub use error::{Error, ErrorCode, Result};
