//! napi-rs bindings over `multifd-core`: type conversion and error codes only.

pub mod codec;
mod errors;
