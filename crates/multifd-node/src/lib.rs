//! napi-rs bindings over `multifd-core`: type conversion and error codes only.

pub mod block;
pub mod codec;
pub mod control_messages;
mod errors;
pub mod events;
pub mod files;
pub mod limits;
pub mod qemu;
pub mod qemu_peer;
mod numbers;
pub mod sessions;
