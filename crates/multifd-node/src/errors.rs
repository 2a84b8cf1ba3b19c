use napi::Status;

/// Carries a core error to JavaScript. The message starts with the stable code
/// (`ERR_MULTIFD_…: …`); the TypeScript facade turns that into `MultifdError.code`.
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
