use crate::ffi;

/// An error from MLX or from a call this binding refused before reaching MLX.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// MLX raised an exception (bad shapes, an allocation failure such as a Metal or CUDA
    /// out-of-memory, an unreadable file, ...). The message is MLX's own.
    #[error("MLX: {0}")]
    Mlx(String),
    /// The binding refused the call (wrong element type, a name with a NUL byte, ...).
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The calling thread's last shim error.
pub(crate) fn last() -> Error {
    // SAFETY: mlxs_last_error returns a pointer to a thread-local, NUL-terminated string that stays
    // valid until the next failing call on this thread; it is copied at once.
    let msg = unsafe { std::ffi::CStr::from_ptr(ffi::mlxs_last_error()) };
    Error::Mlx(msg.to_string_lossy().into_owned())
}

/// Maps a shim status code (0 or -1) to a result.
pub(crate) fn status(code: i32) -> Result<()> {
    if code == 0 { Ok(()) } else { Err(last()) }
}
