// C interface to MLX's C++ API, used by the Rust `mlx` crate.
//
// Conventions:
// - An `mlxs_array*` owns one reference to an MLX array; free it with mlxs_array_free.
// - Functions that create an array return NULL on failure; functions that return int return 0 on
//   success and -1 on failure. The failure's message is in mlxs_last_error() on the same thread.
// - No C++ exception crosses this boundary.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mlxs_array mlxs_array;
typedef struct mlxs_safetensors mlxs_safetensors;

// Element types. Keep in step with `Dtype` in src/dtype.rs.
enum {
  MLXS_BOOL = 0,
  MLXS_UINT8 = 1,
  MLXS_UINT16 = 2,
  MLXS_UINT32 = 3,
  MLXS_UINT64 = 4,
  MLXS_INT8 = 5,
  MLXS_INT16 = 6,
  MLXS_INT32 = 7,
  MLXS_INT64 = 8,
  MLXS_FLOAT16 = 9,
  MLXS_FLOAT32 = 10,
  MLXS_FLOAT64 = 11,
  MLXS_BFLOAT16 = 12,
  MLXS_COMPLEX64 = 13,
};

// Element-wise operations with one operand.
enum {
  MLXS_EXP = 0,
  MLXS_LOG = 1,
  MLXS_SIGMOID = 2,
  MLXS_NEGATIVE = 3,
  MLXS_SQRT = 4,
  MLXS_RSQRT = 5,
  MLXS_ABS = 6,
  MLXS_LOGICAL_NOT = 7,
  MLXS_SIN = 8,
  MLXS_COS = 9,
  MLXS_SILU = 10,
  MLXS_ISNAN = 11,
};

// Element-wise operations with two operands (broadcasting).
enum {
  MLXS_ADD = 0,
  MLXS_SUBTRACT = 1,
  MLXS_MULTIPLY = 2,
  MLXS_DIVIDE = 3,
  MLXS_MAXIMUM = 4,
  MLXS_MINIMUM = 5,
  MLXS_GREATER = 6,
  MLXS_GREATER_EQUAL = 7,
  MLXS_LESS = 8,
  MLXS_LESS_EQUAL = 9,
  MLXS_EQUAL = 10,
  MLXS_LOGICAL_AND = 11,
  MLXS_LOGICAL_OR = 12,
  MLXS_POWER = 13,
};

// Reductions along one axis.
enum {
  MLXS_SUM = 0,
  MLXS_MAX = 1,
  MLXS_MIN = 2,
  MLXS_MEAN = 3,
  MLXS_ARGMAX = 4,
  MLXS_ARGMIN = 5,
  MLXS_LOGSUMEXP = 6,
};

// Devices.
enum {
  MLXS_CPU = 0,
  MLXS_GPU = 1,
};

const char* mlxs_last_error(void);
const char* mlxs_version(void);
/* The primitives not yet evaluated behind `arrays`, one "Name count" line per kind (a diagnostic:
   how many operations a step costs). Valid until the next call on the same thread; NULL on error. */
const char* mlxs_graph_ops(mlxs_array* const* arrays, size_t n);

// Devices and memory.
int mlxs_gpu_available(void);
int mlxs_set_default_device(int device);
int mlxs_default_device(void);
/* 1 when the default device is a GPU of MLX's CUDA backend. */
int mlxs_default_device_is_cuda(void);
size_t mlxs_active_memory(void);
size_t mlxs_peak_memory(void);
size_t mlxs_cache_memory(void);
void mlxs_reset_peak_memory(void);
void mlxs_clear_cache(void);
size_t mlxs_set_memory_limit(size_t bytes);
size_t mlxs_set_cache_limit(size_t bytes);

// Lifetime and inspection.
void mlxs_array_free(mlxs_array* a);
mlxs_array* mlxs_array_clone(const mlxs_array* a);
int mlxs_array_ndim(const mlxs_array* a);
int mlxs_array_shape(const mlxs_array* a, int32_t* out, int cap);
int mlxs_array_dtype(const mlxs_array* a);
size_t mlxs_array_size(const mlxs_array* a);
size_t mlxs_array_nbytes(const mlxs_array* a);

// Creation and reading back.
mlxs_array* mlxs_from_data(const void* data, const int32_t* shape, int ndim, int dtype);
mlxs_array* mlxs_scalar_f64(double value, int dtype);
mlxs_array* mlxs_arange(double start, double stop, double step, int dtype);
mlxs_array* mlxs_zeros(const int32_t* shape, int ndim, int dtype);
// Evaluates `a`, which must have dtype `dtype`, and copies its elements (row-major) into `out`.
int mlxs_read(const mlxs_array* a, int dtype, void* out, size_t nbytes);

// Evaluation.
int mlxs_eval(mlxs_array* const* arrays, size_t n);
int mlxs_async_eval(mlxs_array* const* arrays, size_t n);

// Element-wise and shape operations.
mlxs_array* mlxs_unary(int op, const mlxs_array* a);
mlxs_array* mlxs_binary(int op, const mlxs_array* a, const mlxs_array* b);
mlxs_array* mlxs_where(const mlxs_array* cond, const mlxs_array* x, const mlxs_array* y);
mlxs_array* mlxs_astype(const mlxs_array* a, int dtype);
mlxs_array* mlxs_reshape(const mlxs_array* a, const int32_t* shape, int ndim);
mlxs_array* mlxs_transpose(const mlxs_array* a, const int32_t* axes, int n);
mlxs_array* mlxs_expand_dims(const mlxs_array* a, int axis);
mlxs_array* mlxs_squeeze(const mlxs_array* a, int axis);
mlxs_array* mlxs_broadcast_to(const mlxs_array* a, const int32_t* shape, int ndim);
mlxs_array* mlxs_contiguous(const mlxs_array* a);
mlxs_array* mlxs_concatenate(mlxs_array* const* arrays, size_t n, int axis);
mlxs_array* mlxs_slice(const mlxs_array* a, const int32_t* start, const int32_t* stop,
                       const int32_t* strides, int ndim);
mlxs_array* mlxs_slice_update(const mlxs_array* src, const mlxs_array* update,
                              const int32_t* start, const int32_t* stop, const int32_t* strides,
                              int ndim);
mlxs_array* mlxs_take(const mlxs_array* a, const mlxs_array* indices, int axis);
mlxs_array* mlxs_take_along_axis(const mlxs_array* a, const mlxs_array* indices, int axis);
mlxs_array* mlxs_put_along_axis(const mlxs_array* a, const mlxs_array* indices,
                                const mlxs_array* values, int axis);

// Reductions, sorting and normalisation.
mlxs_array* mlxs_reduce(int op, const mlxs_array* a, int axis, int keepdims);
mlxs_array* mlxs_softmax(const mlxs_array* a, int axis, int precise);
mlxs_array* mlxs_sort(const mlxs_array* a, int axis);
mlxs_array* mlxs_argsort(const mlxs_array* a, int axis);
mlxs_array* mlxs_argpartition(const mlxs_array* a, int kth, int axis);
mlxs_array* mlxs_cumsum(const mlxs_array* a, int axis, int reverse, int inclusive);

// Linear algebra.
mlxs_array* mlxs_matmul(const mlxs_array* a, const mlxs_array* b);
mlxs_array* mlxs_addmm(const mlxs_array* c, const mlxs_array* a, const mlxs_array* b, float alpha,
                       float beta);
mlxs_array* mlxs_quantized_matmul(const mlxs_array* x, const mlxs_array* w,
                                  const mlxs_array* scales, const mlxs_array* biases /* nullable */,
                                  int transpose, int group_size, int bits);
mlxs_array* mlxs_dequantize(const mlxs_array* w, const mlxs_array* scales,
                            const mlxs_array* biases /* nullable */, int group_size, int bits);
mlxs_array* mlxs_quantize(const mlxs_array* w, int group_size, int bits, mlxs_array** scales,
                          mlxs_array** biases);

// Fast kernels.
mlxs_array* mlxs_rms_norm(const mlxs_array* x, const mlxs_array* weight /* nullable */, float eps);
// `offset` is used when `offset_array` is NULL; `freqs` replaces `base` when not NULL.
mlxs_array* mlxs_rope(const mlxs_array* x, int dims, int traditional, float base, float scale,
                      int offset, const mlxs_array* offset_array, const mlxs_array* freqs);
// `mask_mode` is "" or "causal"; `mask` (nullable) is an additive or boolean mask array.
mlxs_array* mlxs_sdpa(const mlxs_array* q, const mlxs_array* k, const mlxs_array* v, float scale,
                      const char* mask_mode, const mlxs_array* mask);
// Whether mlxs_padded_attention runs here for heads of head_dim: MLX's CUDA backend, on the
// GPU, head_dim a multiple of 32 up to 256.
int mlxs_padded_attention_available(int head_dim);
// Decode attention of q [B, H, 1, D] over k, v [B, Hkv, N, D], row b over columns [starts[b], N).
mlxs_array* mlxs_padded_attention(const mlxs_array* q, const mlxs_array* k, const mlxs_array* v,
                                  float scale, const mlxs_array* starts);
// A bfloat16 matrix product on the CPU with exactly the results of MLX's own (gemm.cpp).
// 1 where offered (everywhere but Apple's Accelerate build of MLX), else 0.
int mlxs_packed_matmul_supported(void);
// A 2-D bfloat16 weight [n, k] packed as [ceil(n / 8), k, 8] for mlxs_packed_matmul.
mlxs_array* mlxs_pack_weight(const mlxs_array* w);
// x [..., k] bfloat16 times the packed weight's [n, k] transposed, plus bias [n] when not NULL:
// what mlxs_matmul(x, w^T) (or mlxs_addmm(bias, x, w^T, 1, 1)) gives, on the CPU stream.
mlxs_array* mlxs_packed_matmul(const mlxs_array* x, const mlxs_array* packed, int n, const mlxs_array* bias /* nullable */);

// silu(gate) * x, compiled as one fused function, as mlx-lm's `swiglu`.
mlxs_array* mlxs_swiglu(const mlxs_array* gate, const mlxs_array* x);

// Random numbers.
mlxs_array* mlxs_random_key(uint64_t seed);
int mlxs_random_split(const mlxs_array* key, mlxs_array** a, mlxs_array** b);
mlxs_array* mlxs_random_categorical(const mlxs_array* logits, int axis, const mlxs_array* key);
mlxs_array* mlxs_random_uniform(const int32_t* shape, int ndim, int dtype, const mlxs_array* key);

// Safetensors files.
mlxs_safetensors* mlxs_load_safetensors(const char* path);
size_t mlxs_safetensors_len(const mlxs_safetensors* st);
const char* mlxs_safetensors_name(const mlxs_safetensors* st, size_t i);
mlxs_array* mlxs_safetensors_array(const mlxs_safetensors* st, size_t i);
const char* mlxs_safetensors_metadata(const mlxs_safetensors* st, const char* key);
void mlxs_safetensors_free(mlxs_safetensors* st);
int mlxs_save_safetensors(const char* path, const char* const* names, mlxs_array* const* arrays,
                          size_t n);

#ifdef __cplusplus
}
#endif
