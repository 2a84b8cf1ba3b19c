//! Core errors as JavaScript errors whose `code` property is the stable `ERR_MULTIFD_*` code
//! and whose message is the core's message: the code crosses as a code, not as text.

use napi::Status;

/// What the session bindings return: the error's status string is the JavaScript `code`.
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

impl<T> IntoCoded<T> for napi::Result<T> {
    /// A napi error from an N-API call, or a core error carried by [`to_napi`]: the latter
    /// gets its code back (an exact lookup of the known code, no parsing of free text).
    fn into_coded(self) -> Result<T> {
        self.map_err(|e| {
            if let Some((code, message)) = e.reason.split_once(": ")
                && let Some(code) = multifd_core::ErrorCode::from_str_code(code)
            {
                return coded(multifd_core::Error::new(code, message));
            }
            coded(multifd_core::Error::new(multifd_core::ErrorCode::Io, format!("{}: {}", e.status, e.reason)))
        })
    }
}

/// Carries a core error to JavaScript in bindings that still return `napi::Result` (blocks,
/// codec, files): the message starts with the stable code (`ERR_MULTIFD_…: …`). Session
/// bindings use [`coded`] instead.
pub fn to_napi(e: multifd_core::Error) -> napi::Error {
    napi::Error::new(Status::GenericFailure, e.to_string())
}

pub trait IntoNapi<T> {
    fn into_napi(self) -> napi::Result<T>;
}

impl<T> IntoNapi<T> for multifd_core::Result<T> {
    fn into_napi(self) -> napi::Result<T> {
        self.map_err(to_napi)
    }
}
