//! MLX's memory counters and limits (bytes).
use crate::ffi;

/// Memory held by live arrays.
pub fn active() -> usize {
    // SAFETY: plain query.
    unsafe { ffi::mlxs_active_memory() }
}

/// The highest `active()` since start or the last [`reset_peak`].
pub fn peak() -> usize {
    // SAFETY: plain query.
    unsafe { ffi::mlxs_peak_memory() }
}

/// Memory kept in MLX's buffer cache for reuse.
pub fn cache() -> usize {
    // SAFETY: plain query.
    unsafe { ffi::mlxs_cache_memory() }
}

pub fn reset_peak() {
    // SAFETY: plain call.
    unsafe { ffi::mlxs_reset_peak_memory() }
}

/// Returns cached buffers to the system.
pub fn clear_cache() {
    // SAFETY: plain call.
    unsafe { ffi::mlxs_clear_cache() }
}

/// Sets the allocation limit; returns the previous one.
pub fn set_memory_limit(bytes: usize) -> usize {
    // SAFETY: plain call.
    unsafe { ffi::mlxs_set_memory_limit(bytes) }
}

/// Sets the buffer-cache limit; returns the previous one.
pub fn set_cache_limit(bytes: usize) -> usize {
    // SAFETY: plain call.
    unsafe { ffi::mlxs_set_cache_limit(bytes) }
}
