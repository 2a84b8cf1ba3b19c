use multifd_core::{Error, ErrorCode};

use crate::errors::{IntoCoded, Result};

/// A JavaScript number that must be a safe non-negative integer.
pub fn to_u64(v: f64, what: &str) -> Result<u64> {
    if v >= 0.0 && v.fract() == 0.0 && v <= 9_007_199_254_740_991.0 {
        Ok(v as u64)
    } else {
        Err(Error::new(ErrorCode::InvalidArgument, format!("{what} must be a safe non-negative integer, got {v}"))).into_coded()
    }
}

pub fn uuid(bytes: &[u8]) -> Result<[u8; 16]> {
    bytes
        .try_into()
        .map_err(|_| Error::new(ErrorCode::InvalidArgument, format!("a session UUID is 16 bytes, got {}", bytes.len())))
        .into_coded()
}

pub fn code(s: &str) -> ErrorCode {
    ErrorCode::from_str_code(s).unwrap_or(ErrorCode::Protocol)
}
