//! Raw declarations of the C shim (shim/shim.h). Only this crate's safe wrappers call these.
#![allow(non_camel_case_types)]

use std::ffi::c_char;

#[repr(C)]
pub struct mlxs_array {
    _private: [u8; 0],
}

#[repr(C)]
pub struct mlxs_safetensors {
    _private: [u8; 0],
}

pub type Arr = *mut mlxs_array;
pub type CArr = *const mlxs_array;

// Element-wise operations with one operand.
pub const EXP: i32 = 0;
pub const LOG: i32 = 1;
pub const SIGMOID: i32 = 2;
pub const NEGATIVE: i32 = 3;
pub const SQRT: i32 = 4;
pub const RSQRT: i32 = 5;
pub const ABS: i32 = 6;
pub const LOGICAL_NOT: i32 = 7;
pub const SIN: i32 = 8;
pub const COS: i32 = 9;
pub const SILU: i32 = 10;
pub const ISNAN: i32 = 11;

// Element-wise operations with two operands.
pub const ADD: i32 = 0;
pub const SUBTRACT: i32 = 1;
pub const MULTIPLY: i32 = 2;
pub const DIVIDE: i32 = 3;
pub const MAXIMUM: i32 = 4;
pub const MINIMUM: i32 = 5;
pub const GREATER: i32 = 6;
pub const GREATER_EQUAL: i32 = 7;
pub const LESS: i32 = 8;
pub const LESS_EQUAL: i32 = 9;
pub const EQUAL: i32 = 10;
pub const LOGICAL_AND: i32 = 11;
pub const LOGICAL_OR: i32 = 12;
pub const POWER: i32 = 13;

// Reductions.
pub const SUM: i32 = 0;
pub const MAX: i32 = 1;
pub const MIN: i32 = 2;
pub const MEAN: i32 = 3;
pub const ARGMAX: i32 = 4;
pub const ARGMIN: i32 = 5;
pub const LOGSUMEXP: i32 = 6;

pub const CPU: i32 = 0;
pub const GPU: i32 = 1;

unsafe extern "C" {
    pub fn mlxs_last_error() -> *const c_char;
    pub fn mlxs_version() -> *const c_char;
    pub fn mlxs_graph_ops(arrays: *const Arr, n: usize) -> *const c_char;

    pub fn mlxs_gpu_available() -> i32;
    pub fn mlxs_set_default_device(device: i32) -> i32;
    pub fn mlxs_default_device() -> i32;
    pub fn mlxs_default_device_is_cuda() -> i32;
    pub fn mlxs_active_memory() -> usize;
    pub fn mlxs_peak_memory() -> usize;
    pub fn mlxs_cache_memory() -> usize;
    pub fn mlxs_reset_peak_memory();
    pub fn mlxs_clear_cache();
    pub fn mlxs_set_memory_limit(bytes: usize) -> usize;
    pub fn mlxs_set_cache_limit(bytes: usize) -> usize;

    pub fn mlxs_array_free(a: Arr);
    pub fn mlxs_array_clone(a: CArr) -> Arr;
    pub fn mlxs_array_ndim(a: CArr) -> i32;
    pub fn mlxs_array_shape(a: CArr, out: *mut i32, cap: i32) -> i32;
    pub fn mlxs_array_dtype(a: CArr) -> i32;
    pub fn mlxs_array_size(a: CArr) -> usize;
    pub fn mlxs_array_nbytes(a: CArr) -> usize;

    pub fn mlxs_from_data(data: *const std::ffi::c_void, shape: *const i32, ndim: i32, dtype: i32) -> Arr;
    pub fn mlxs_scalar_f64(value: f64, dtype: i32) -> Arr;
    pub fn mlxs_arange(start: f64, stop: f64, step: f64, dtype: i32) -> Arr;
    pub fn mlxs_zeros(shape: *const i32, ndim: i32, dtype: i32) -> Arr;
    pub fn mlxs_read(a: CArr, dtype: i32, out: *mut std::ffi::c_void, nbytes: usize) -> i32;

    pub fn mlxs_eval(arrays: *const Arr, n: usize) -> i32;
    pub fn mlxs_async_eval(arrays: *const Arr, n: usize) -> i32;

    pub fn mlxs_unary(op: i32, a: CArr) -> Arr;
    pub fn mlxs_binary(op: i32, a: CArr, b: CArr) -> Arr;
    pub fn mlxs_where(cond: CArr, x: CArr, y: CArr) -> Arr;
    pub fn mlxs_astype(a: CArr, dtype: i32) -> Arr;
    pub fn mlxs_reshape(a: CArr, shape: *const i32, ndim: i32) -> Arr;
    pub fn mlxs_transpose(a: CArr, axes: *const i32, n: i32) -> Arr;
    pub fn mlxs_expand_dims(a: CArr, axis: i32) -> Arr;
    pub fn mlxs_squeeze(a: CArr, axis: i32) -> Arr;
    pub fn mlxs_broadcast_to(a: CArr, shape: *const i32, ndim: i32) -> Arr;
    pub fn mlxs_contiguous(a: CArr) -> Arr;
    pub fn mlxs_concatenate(arrays: *const Arr, n: usize, axis: i32) -> Arr;
    pub fn mlxs_slice(a: CArr, start: *const i32, stop: *const i32, strides: *const i32, ndim: i32) -> Arr;
    pub fn mlxs_slice_update(
        src: CArr,
        update: CArr,
        start: *const i32,
        stop: *const i32,
        strides: *const i32,
        ndim: i32,
    ) -> Arr;
    pub fn mlxs_take(a: CArr, indices: CArr, axis: i32) -> Arr;
    pub fn mlxs_take_along_axis(a: CArr, indices: CArr, axis: i32) -> Arr;
    pub fn mlxs_put_along_axis(a: CArr, indices: CArr, values: CArr, axis: i32) -> Arr;

    pub fn mlxs_reduce(op: i32, a: CArr, axis: i32, keepdims: i32) -> Arr;
    pub fn mlxs_softmax(a: CArr, axis: i32, precise: i32) -> Arr;
    pub fn mlxs_sort(a: CArr, axis: i32) -> Arr;
    pub fn mlxs_argsort(a: CArr, axis: i32) -> Arr;
    pub fn mlxs_argpartition(a: CArr, kth: i32, axis: i32) -> Arr;
    pub fn mlxs_cumsum(a: CArr, axis: i32, reverse: i32, inclusive: i32) -> Arr;

    pub fn mlxs_matmul(a: CArr, b: CArr) -> Arr;
    pub fn mlxs_addmm(c: CArr, a: CArr, b: CArr, alpha: f32, beta: f32) -> Arr;
    pub fn mlxs_quantized_matmul(
        x: CArr,
        w: CArr,
        scales: CArr,
        biases: CArr,
        transpose: i32,
        group_size: i32,
        bits: i32,
    ) -> Arr;
    pub fn mlxs_dequantize(w: CArr, scales: CArr, biases: CArr, group_size: i32, bits: i32) -> Arr;
    pub fn mlxs_quantize(w: CArr, group_size: i32, bits: i32, scales: *mut Arr, biases: *mut Arr) -> Arr;

    pub fn mlxs_rms_norm(x: CArr, weight: CArr, eps: f32) -> Arr;
    pub fn mlxs_rope(
        x: CArr,
        dims: i32,
        traditional: i32,
        base: f32,
        scale: f32,
        offset: i32,
        offset_array: CArr,
        freqs: CArr,
    ) -> Arr;
    pub fn mlxs_sdpa(q: CArr, k: CArr, v: CArr, scale: f32, mask_mode: *const c_char, mask: CArr) -> Arr;
    pub fn mlxs_padded_attention_available(head_dim: i32) -> i32;
    pub fn mlxs_padded_attention(q: CArr, k: CArr, v: CArr, scale: f32, starts: CArr) -> Arr;
    pub fn mlxs_swiglu(gate: CArr, x: CArr) -> Arr;
    pub fn mlxs_packed_matmul_supported() -> i32;
    pub fn mlxs_pack_weight(w: CArr) -> Arr;
    pub fn mlxs_packed_matmul(x: CArr, packed: CArr, n: i32, bias: CArr) -> Arr;

    pub fn mlxs_random_key(seed: u64) -> Arr;
    pub fn mlxs_random_split(key: CArr, a: *mut Arr, b: *mut Arr) -> i32;
    pub fn mlxs_random_categorical(logits: CArr, axis: i32, key: CArr) -> Arr;
    pub fn mlxs_random_uniform(shape: *const i32, ndim: i32, dtype: i32, key: CArr) -> Arr;

    pub fn mlxs_load_safetensors(path: *const c_char) -> *mut mlxs_safetensors;
    pub fn mlxs_safetensors_len(st: *const mlxs_safetensors) -> usize;
    pub fn mlxs_safetensors_name(st: *const mlxs_safetensors, i: usize) -> *const c_char;
    pub fn mlxs_safetensors_array(st: *const mlxs_safetensors, i: usize) -> Arr;
    pub fn mlxs_safetensors_metadata(st: *const mlxs_safetensors, key: *const c_char) -> *const c_char;
    pub fn mlxs_safetensors_free(st: *mut mlxs_safetensors);
    pub fn mlxs_save_safetensors(path: *const c_char, names: *const *const c_char, arrays: *const Arr, n: usize)
    -> i32;
}
