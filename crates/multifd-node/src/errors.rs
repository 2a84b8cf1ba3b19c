//! Core errors as JavaScript errors whose `code` property is the stable `ERR_MULTIFD_*` code
//! and whose message is the core's message: the code crosses as a code, not as text.

/// What every binding returns: the error's status string is the JavaScript `code`.
pub type Result<T> = napi::Result<T, String>;

/// A core error as a coded napi error.
pub fn coded(e: multifd_core::Error) -> napi::Error<String> {
    napi::Error::new(e.code.as_str().to_owned(), e.message)
}

pub trait IntoCoded<T> {
    fn into_coded(self) -> Result<T>;
}

impl<T> IntoCoded<T> for multifd_core::Result<T> {
    fn into_coded(self) -> Result<T> {
        self.map_err(coded)
    }
}

impl<T> IntoCoded<T> for Result<T> {
    fn into_coded(self) -> Result<T> {
        self
    }
}

impl<T> IntoCoded<T> for napi::Result<T> {
    /// An error from an N-API call itself (no core error involved).
    fn into_coded(self) -> Result<T> {
        self.map_err(|e| coded(multifd_core::Error::new(multifd_core::ErrorCode::Io, format!("{}: {}", e.status, e.reason))))
    }
}
