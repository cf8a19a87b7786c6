//! Counter-based random numbers with explicit keys, so sampling is reproducible from a seed.
use std::ptr;

use crate::array::wrap;
use crate::error::status;
use crate::{Array, Dtype, Result, ffi};

/// A PRNG key from a seed.
pub fn key(seed: u64) -> Result<Array> {
    // SAFETY: plain constructor.
    wrap(unsafe { ffi::mlxs_random_key(seed) })
}

/// Two independent keys derived from `key`.
pub fn split(key: &Array) -> Result<(Array, Array)> {
    let mut a = ptr::null_mut();
    let mut b = ptr::null_mut();
    // SAFETY: the out-pointers are written only on success.
    status(unsafe { ffi::mlxs_random_split(key.raw(), &mut a, &mut b) })?;
    Ok((wrap(a)?, wrap(b)?))
}

/// Samples indices from unnormalised log-probabilities along `axis`.
pub fn categorical(logits: &Array, axis: i32, key: &Array) -> Result<Array> {
    // SAFETY: live handles.
    wrap(unsafe { ffi::mlxs_random_categorical(logits.raw(), axis, key.raw()) })
}

/// Uniform samples in [0, 1).
pub fn uniform(shape: &[i32], dtype: Dtype, key: &Array) -> Result<Array> {
    // SAFETY: the shape slice is valid for the call.
    wrap(unsafe { ffi::mlxs_random_uniform(shape.as_ptr(), shape.len() as i32, dtype as i32, key.raw()) })
}
