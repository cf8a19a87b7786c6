//! Safe Rust binding to MLX's C++ API.
//!
//! MLX is reached through a thin C++ shim (`shim/`) built against the official MLX distribution
//! (see `build.rs`). Every C++ exception becomes an [`Error`]; nothing aborts across the boundary.
//! Arrays are lazy: operations build a graph and [`eval`] computes it.
//!
//! MLX keeps a default stream per thread, so a program should do all its MLX work on one thread.

mod array;
mod dtype;
mod error;
pub mod fast;
mod ffi;
pub mod io;
pub mod memory;
pub mod random;

pub use array::{Array, Element, async_eval, concatenate, eval, graph_op_count, graph_ops, where_cond};
pub use dtype::Dtype;
pub use error::{Error, Result};

/// The MLX version this binary runs against (from libmlx at run time).
pub fn version() -> String {
    // SAFETY: mlxs_version returns a static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(ffi::mlxs_version()) }.to_string_lossy().into_owned()
}

/// A compute device kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Gpu,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Gpu => "gpu",
        })
    }
}

/// Whether MLX has a GPU here (Metal on Apple Silicon, CUDA on NVIDIA).
pub fn gpu_available() -> bool {
    // SAFETY: plain query.
    unsafe { ffi::mlxs_gpu_available() == 1 }
}

/// Makes `device` the default for MLX work on the calling thread's streams.
pub fn set_default_device(device: Device) -> Result<()> {
    if device == Device::Gpu && !gpu_available() {
        return Err(Error::Invalid(
            "MLX has no GPU on this machine (this MLX build is CPU-only, or no device was found)".into(),
        ));
    }
    let code = match device {
        Device::Cpu => ffi::CPU,
        Device::Gpu => ffi::GPU,
    };
    // SAFETY: plain call; errors are reported through the return code.
    error::status(unsafe { ffi::mlxs_set_default_device(code) })
}

/// Whether the current default device is a GPU of MLX's CUDA backend (not Metal, not the CPU).
pub fn default_device_is_cuda() -> bool {
    // SAFETY: plain query.
    unsafe { ffi::mlxs_default_device_is_cuda() == 1 }
}

/// The current default device.
pub fn default_device() -> Device {
    // SAFETY: plain query.
    if unsafe { ffi::mlxs_default_device() } == ffi::GPU { Device::Gpu } else { Device::Cpu }
}
