// Thin C wrapper over MLX's C++ API. Every entry point catches C++ exceptions and turns them into an
// error value plus a thread-local message, so no exception (and no abort) crosses into Rust.
#include "shim.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "internal.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

struct mlxs_safetensors {
  std::vector<std::pair<std::string, mx::array>> arrays;
  std::unordered_map<std::string, std::string> metadata;
};

namespace {

thread_local std::string last_error;

void set_error(const char* what) { last_error = what ? what : "unknown MLX error"; }

mlxs_array* wrap(mx::array a) { return new mlxs_array{std::move(a)}; }

mx::Dtype to_dtype(int code) {
  switch (code) {
    case MLXS_BOOL: return mx::bool_;
    case MLXS_UINT8: return mx::uint8;
    case MLXS_UINT16: return mx::uint16;
    case MLXS_UINT32: return mx::uint32;
    case MLXS_UINT64: return mx::uint64;
    case MLXS_INT8: return mx::int8;
    case MLXS_INT16: return mx::int16;
    case MLXS_INT32: return mx::int32;
    case MLXS_INT64: return mx::int64;
    case MLXS_FLOAT16: return mx::float16;
    case MLXS_FLOAT32: return mx::float32;
    case MLXS_FLOAT64: return mx::float64;
    case MLXS_BFLOAT16: return mx::bfloat16;
    case MLXS_COMPLEX64: return mx::complex64;
  }
  throw std::invalid_argument("unknown dtype code " + std::to_string(code));
}

int from_dtype(mx::Dtype d) {
  switch (d.val()) {
    case mx::Dtype::Val::bool_: return MLXS_BOOL;
    case mx::Dtype::Val::uint8: return MLXS_UINT8;
    case mx::Dtype::Val::uint16: return MLXS_UINT16;
    case mx::Dtype::Val::uint32: return MLXS_UINT32;
    case mx::Dtype::Val::uint64: return MLXS_UINT64;
    case mx::Dtype::Val::int8: return MLXS_INT8;
    case mx::Dtype::Val::int16: return MLXS_INT16;
    case mx::Dtype::Val::int32: return MLXS_INT32;
    case mx::Dtype::Val::int64: return MLXS_INT64;
    case mx::Dtype::Val::float16: return MLXS_FLOAT16;
    case mx::Dtype::Val::float32: return MLXS_FLOAT32;
    case mx::Dtype::Val::float64: return MLXS_FLOAT64;
    case mx::Dtype::Val::bfloat16: return MLXS_BFLOAT16;
    case mx::Dtype::Val::complex64: return MLXS_COMPLEX64;
  }
  return -1;
}

mx::Shape to_shape(const int32_t* p, int n) { return mx::Shape(p, p + n); }

std::vector<mx::array> to_vec(mlxs_array* const* arrays, size_t n) {
  std::vector<mx::array> v;
  v.reserve(n);
  for (size_t i = 0; i < n; ++i) v.push_back(arrays[i]->a);
  return v;
}

// Runs `f`, which returns nothing; returns 0 or -1.
template <typename F>
int guard_status(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    set_error(e.what());
  } catch (...) {
    set_error(nullptr);
  }
  return -1;
}

std::vector<mx::array> swiglu_impl(const std::vector<mx::array>& in) {
  const auto& gate = in[0];
  return {mx::multiply(mx::multiply(gate, mx::sigmoid(gate)), in[1])};
}

}  // namespace

void mlxs_set_error(const char* what) { set_error(what); }

extern "C" {

const char* mlxs_last_error(void) { return last_error.c_str(); }

const char* mlxs_version(void) { return mx::version(); }

const char* mlxs_graph_ops(mlxs_array* const* arrays, size_t n) {
  static thread_local std::string out;
  try {
    std::map<std::string, size_t> counts;
    std::unordered_set<std::uintptr_t> seen;
    std::vector<mx::array> stack = to_vec(arrays, n);
    while (!stack.empty()) {
      mx::array a = std::move(stack.back());
      stack.pop_back();
      if (!a.has_primitive() || !seen.insert(a.id()).second) continue;
      // The outputs of one operation (siblings) count once. Calls of a compiled function share
      // one primitive object, so operations are told apart by their outputs, not by it.
      for (const auto& s : a.siblings()) seen.insert(s.id());
      counts[a.primitive().name()]++;
      for (const auto& in : a.inputs()) stack.push_back(in);
    }
    out.clear();
    for (const auto& [name, count] : counts) {
      out += name + " " + std::to_string(count) + "\n";
    }
    return out.c_str();
  } catch (const std::exception& e) {
    mlxs_set_error(e.what());
    return nullptr;
  }
}

int mlxs_gpu_available(void) {
  try {
    return mx::is_available(mx::Device::gpu) ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

int mlxs_set_default_device(int device) {
  return guard_status([&] {
    mx::set_default_device(device == MLXS_GPU ? mx::Device::gpu : mx::Device::cpu);
  });
}

int mlxs_default_device(void) {
  return mx::default_device().type == mx::Device::gpu ? MLXS_GPU : MLXS_CPU;
}

int mlxs_default_device_is_cuda(void) {
  try {
    return mx::cu::is_available() && mx::default_device().type == mx::Device::gpu ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

size_t mlxs_active_memory(void) { return mx::get_active_memory(); }
size_t mlxs_peak_memory(void) { return mx::get_peak_memory(); }
size_t mlxs_cache_memory(void) { return mx::get_cache_memory(); }
void mlxs_reset_peak_memory(void) { mx::reset_peak_memory(); }
void mlxs_clear_cache(void) { mx::clear_cache(); }
size_t mlxs_set_memory_limit(size_t bytes) { return mx::set_memory_limit(bytes); }
size_t mlxs_set_cache_limit(size_t bytes) { return mx::set_cache_limit(bytes); }

void mlxs_array_free(mlxs_array* a) { delete a; }

mlxs_array* mlxs_array_clone(const mlxs_array* a) {
  return guard([&] { return a->a; });
}

int mlxs_array_ndim(const mlxs_array* a) { return static_cast<int>(a->a.ndim()); }

int mlxs_array_shape(const mlxs_array* a, int32_t* out, int cap) {
  const auto& s = a->a.shape();
  int n = static_cast<int>(s.size());
  for (int i = 0; i < n && i < cap; ++i) out[i] = s[i];
  return n;
}

int mlxs_array_dtype(const mlxs_array* a) { return from_dtype(a->a.dtype()); }
size_t mlxs_array_size(const mlxs_array* a) { return a->a.size(); }
size_t mlxs_array_nbytes(const mlxs_array* a) { return a->a.nbytes(); }

mlxs_array* mlxs_from_data(const void* data, const int32_t* shape, int ndim, int dtype) {
  return guard([&] {
    auto dt = to_dtype(dtype);
    auto sh = to_shape(shape, ndim);
    size_t n = 1;
    for (auto d : sh) n *= static_cast<size_t>(d);
    // Copy so that the caller's memory can go away; MLX frees the copy when it is done with it.
    size_t bytes = n * dt.size();
    void* copy = std::malloc(bytes > 0 ? bytes : 1);
    if (!copy) throw std::bad_alloc();
    if (bytes > 0) std::memcpy(copy, data, bytes);
    return mx::array(copy, sh, dt, [](void* p) { std::free(p); });
  });
}

mlxs_array* mlxs_scalar_f64(double value, int dtype) {
  return guard([&] { return mx::astype(mx::array(static_cast<float>(value)), to_dtype(dtype)); });
}

mlxs_array* mlxs_arange(double start, double stop, double step, int dtype) {
  return guard([&] { return mx::arange(start, stop, step, to_dtype(dtype)); });
}

mlxs_array* mlxs_zeros(const int32_t* shape, int ndim, int dtype) {
  return guard([&] { return mx::zeros(to_shape(shape, ndim), to_dtype(dtype)); });
}

int mlxs_read(const mlxs_array* a, int dtype, void* out, size_t nbytes) {
  return guard_status([&] {
    if (from_dtype(a->a.dtype()) != dtype) throw std::invalid_argument("mlxs_read: dtype mismatch");
    if (a->a.nbytes() != nbytes) throw std::invalid_argument("mlxs_read: size mismatch");
    // Waits for this array's own work only. A copy made now to get contiguous data would queue
    // on the array's stream behind everything given to it since (on a GPU, the next decode
    // step launched before this read) and wait for all of that; a copy that is needed runs on
    // the CPU, after the array is ready.
    mx::array c = a->a;
    c.eval();
    if (!c.flags().row_contiguous) {
      c = mx::contiguous(c, false, mx::Device::cpu);
      c.eval();
    }
    if (nbytes > 0) std::memcpy(out, c.data<void>(), nbytes);
  });
}

int mlxs_eval(mlxs_array* const* arrays, size_t n) {
  return guard_status([&] { mx::eval(to_vec(arrays, n)); });
}

int mlxs_async_eval(mlxs_array* const* arrays, size_t n) {
  return guard_status([&] { mx::async_eval(to_vec(arrays, n)); });
}

mlxs_array* mlxs_unary(int op, const mlxs_array* x) {
  return guard([&] {
    const auto& a = x->a;
    switch (op) {
      case MLXS_EXP: return mx::exp(a);
      case MLXS_LOG: return mx::log(a);
      case MLXS_SIGMOID: return mx::sigmoid(a);
      case MLXS_NEGATIVE: return mx::negative(a);
      case MLXS_SQRT: return mx::sqrt(a);
      case MLXS_RSQRT: return mx::rsqrt(a);
      case MLXS_ABS: return mx::abs(a);
      case MLXS_LOGICAL_NOT: return mx::logical_not(a);
      case MLXS_SIN: return mx::sin(a);
      case MLXS_COS: return mx::cos(a);
      case MLXS_SILU: return mx::multiply(a, mx::sigmoid(a));
      case MLXS_ISNAN: return mx::isnan(a);
    }
    throw std::invalid_argument("unknown unary op " + std::to_string(op));
  });
}

mlxs_array* mlxs_binary(int op, const mlxs_array* x, const mlxs_array* y) {
  return guard([&] {
    const auto& a = x->a;
    const auto& b = y->a;
    switch (op) {
      case MLXS_ADD: return mx::add(a, b);
      case MLXS_SUBTRACT: return mx::subtract(a, b);
      case MLXS_MULTIPLY: return mx::multiply(a, b);
      case MLXS_DIVIDE: return mx::divide(a, b);
      case MLXS_MAXIMUM: return mx::maximum(a, b);
      case MLXS_MINIMUM: return mx::minimum(a, b);
      case MLXS_GREATER: return mx::greater(a, b);
      case MLXS_GREATER_EQUAL: return mx::greater_equal(a, b);
      case MLXS_LESS: return mx::less(a, b);
      case MLXS_LESS_EQUAL: return mx::less_equal(a, b);
      case MLXS_EQUAL: return mx::equal(a, b);
      case MLXS_LOGICAL_AND: return mx::logical_and(a, b);
      case MLXS_LOGICAL_OR: return mx::logical_or(a, b);
      case MLXS_POWER: return mx::power(a, b);
    }
    throw std::invalid_argument("unknown binary op " + std::to_string(op));
  });
}

mlxs_array* mlxs_where(const mlxs_array* cond, const mlxs_array* x, const mlxs_array* y) {
  return guard([&] { return mx::where(cond->a, x->a, y->a); });
}

mlxs_array* mlxs_astype(const mlxs_array* a, int dtype) {
  return guard([&] { return mx::astype(a->a, to_dtype(dtype)); });
}

mlxs_array* mlxs_reshape(const mlxs_array* a, const int32_t* shape, int ndim) {
  return guard([&] { return mx::reshape(a->a, to_shape(shape, ndim)); });
}

mlxs_array* mlxs_transpose(const mlxs_array* a, const int32_t* axes, int n) {
  return guard([&] { return mx::transpose(a->a, std::vector<int>(axes, axes + n)); });
}

mlxs_array* mlxs_expand_dims(const mlxs_array* a, int axis) {
  return guard([&] { return mx::expand_dims(a->a, axis); });
}

mlxs_array* mlxs_squeeze(const mlxs_array* a, int axis) {
  return guard([&] { return mx::squeeze(a->a, axis); });
}

mlxs_array* mlxs_broadcast_to(const mlxs_array* a, const int32_t* shape, int ndim) {
  return guard([&] { return mx::broadcast_to(a->a, to_shape(shape, ndim)); });
}

mlxs_array* mlxs_contiguous(const mlxs_array* a) {
  return guard([&] { return mx::contiguous(a->a); });
}

mlxs_array* mlxs_concatenate(mlxs_array* const* arrays, size_t n, int axis) {
  return guard([&] { return mx::concatenate(to_vec(arrays, n), axis); });
}

mlxs_array* mlxs_slice(const mlxs_array* a, const int32_t* start, const int32_t* stop,
                       const int32_t* strides, int ndim) {
  return guard([&] {
    return mx::slice(a->a, to_shape(start, ndim), to_shape(stop, ndim), to_shape(strides, ndim));
  });
}

mlxs_array* mlxs_slice_update(const mlxs_array* src, const mlxs_array* update,
                              const int32_t* start, const int32_t* stop, const int32_t* strides,
                              int ndim) {
  return guard([&] {
    return mx::slice_update(src->a, update->a, to_shape(start, ndim), to_shape(stop, ndim),
                            to_shape(strides, ndim));
  });
}

mlxs_array* mlxs_take(const mlxs_array* a, const mlxs_array* indices, int axis) {
  return guard([&] { return mx::take(a->a, indices->a, axis); });
}

mlxs_array* mlxs_take_along_axis(const mlxs_array* a, const mlxs_array* indices, int axis) {
  return guard([&] { return mx::take_along_axis(a->a, indices->a, axis); });
}

mlxs_array* mlxs_put_along_axis(const mlxs_array* a, const mlxs_array* indices,
                                const mlxs_array* values, int axis) {
  return guard([&] { return mx::put_along_axis(a->a, indices->a, values->a, axis); });
}

mlxs_array* mlxs_reduce(int op, const mlxs_array* x, int axis, int keepdims) {
  return guard([&] {
    const auto& a = x->a;
    bool k = keepdims != 0;
    switch (op) {
      case MLXS_SUM: return mx::sum(a, axis, k);
      case MLXS_MAX: return mx::max(a, axis, k);
      case MLXS_MIN: return mx::min(a, axis, k);
      case MLXS_MEAN: return mx::mean(a, axis, k);
      case MLXS_ARGMAX: return mx::argmax(a, axis, k);
      case MLXS_ARGMIN: return mx::argmin(a, axis, k);
      case MLXS_LOGSUMEXP: return mx::logsumexp(a, axis, k);
    }
    throw std::invalid_argument("unknown reduction " + std::to_string(op));
  });
}

mlxs_array* mlxs_softmax(const mlxs_array* a, int axis, int precise) {
  return guard([&] { return mx::softmax(a->a, std::vector<int>{axis}, precise != 0); });
}

mlxs_array* mlxs_sort(const mlxs_array* a, int axis) {
  return guard([&] { return mx::sort(a->a, axis); });
}

mlxs_array* mlxs_argsort(const mlxs_array* a, int axis) {
  return guard([&] { return mx::argsort(a->a, axis); });
}

mlxs_array* mlxs_argpartition(const mlxs_array* a, int kth, int axis) {
  return guard([&] { return mx::argpartition(a->a, kth, axis); });
}

mlxs_array* mlxs_cumsum(const mlxs_array* a, int axis, int reverse, int inclusive) {
  return guard([&] { return mx::cumsum(a->a, axis, reverse != 0, inclusive != 0); });
}

mlxs_array* mlxs_matmul(const mlxs_array* a, const mlxs_array* b) {
  return guard([&] { return mx::matmul(a->a, b->a); });
}

mlxs_array* mlxs_addmm(const mlxs_array* c, const mlxs_array* a, const mlxs_array* b, float alpha,
                       float beta) {
  return guard([&] { return mx::addmm(c->a, a->a, b->a, alpha, beta); });
}

mlxs_array* mlxs_quantized_matmul(const mlxs_array* x, const mlxs_array* w,
                                  const mlxs_array* scales, const mlxs_array* biases,
                                  int transpose, int group_size, int bits) {
  return guard([&] {
    std::optional<mx::array> b;
    if (biases) b = biases->a;
    const mx::array& xa = x->a;
    // Rows spread over batch dimensions ([batch, 1, k] in a decode step) are folded into one
    // [rows, k] matrix against a 2-D weight. MLX's CUDA backend runs a batched product as one
    // product per batch entry, each reading the whole weight: a step of 32 sequences read the
    // weights 32 times. Folded, they are read once. A plain [rows, k] input is left as it is.
    if (xa.ndim() > 2 && w->a.ndim() == 2 && xa.shape(-1) > 0 &&
        static_cast<int64_t>(xa.size() / xa.shape(-1)) > xa.shape(-2)) {
      auto shape = xa.shape();
      auto y = mx::quantized_matmul(mx::reshape(xa, {-1, xa.shape(-1)}), w->a, scales->a, b,
                                    transpose != 0, group_size, bits, "affine");
      shape.back() = y.shape(-1);
      return mx::reshape(y, shape);
    }
    return mx::quantized_matmul(xa, w->a, scales->a, b, transpose != 0, group_size, bits,
                                "affine");
  });
}

mlxs_array* mlxs_dequantize(const mlxs_array* w, const mlxs_array* scales,
                            const mlxs_array* biases, int group_size, int bits) {
  return guard([&] {
    std::optional<mx::array> b;
    if (biases) b = biases->a;
    return mx::dequantize(w->a, scales->a, b, group_size, bits, "affine");
  });
}

mlxs_array* mlxs_quantize(const mlxs_array* w, int group_size, int bits, mlxs_array** scales,
                          mlxs_array** biases) {
  try {
    auto out = mx::quantize(w->a, group_size, bits, "affine");
    if (out.size() != 3) throw std::runtime_error("quantize: expected weights, scales and biases");
    *scales = wrap(out[1]);
    *biases = wrap(out[2]);
    return wrap(out[0]);
  } catch (const std::exception& e) {
    set_error(e.what());
  } catch (...) {
    set_error(nullptr);
  }
  return nullptr;
}

mlxs_array* mlxs_rms_norm(const mlxs_array* x, const mlxs_array* weight, float eps) {
  return guard([&] {
    std::optional<mx::array> w;
    if (weight) w = weight->a;
    return mx::fast::rms_norm(x->a, w, eps);
  });
}

mlxs_array* mlxs_rope(const mlxs_array* x, int dims, int traditional, float base, float scale,
                      int offset, const mlxs_array* offset_array, const mlxs_array* freqs) {
  return guard([&] {
    std::optional<float> b;
    std::optional<mx::array> f;
    if (freqs) {
      f = freqs->a;
    } else {
      b = base;
    }
    if (offset_array) {
      return mx::fast::rope(x->a, dims, traditional != 0, b, scale, offset_array->a, f);
    }
    return mx::fast::rope(x->a, dims, traditional != 0, b, scale, offset, f);
  });
}

mlxs_array* mlxs_sdpa(const mlxs_array* q, const mlxs_array* k, const mlxs_array* v, float scale,
                      const char* mask_mode, const mlxs_array* mask) {
  return guard([&] {
    std::optional<mx::array> m;
    if (mask) m = mask->a;
    return mx::fast::scaled_dot_product_attention(q->a, k->a, v->a, scale,
                                                  mask_mode ? mask_mode : "", m);
  });
}

// Decode attention over left-padded batch rows as one kernel on MLX's CUDA backend, whose fused
// attention takes no mask: with one, MLX composes it from about 15 operations per layer.
static const char* const kPaddedAttention =
#include "padded_attention.inc"
    ;

// The kernel's head sizes: each lane of a warp holds head_dim / 32 elements.
static bool padded_attention_head_dim(int d) { return d > 0 && d % 32 == 0 && d <= 256; }

int mlxs_padded_attention_available(int head_dim) {
  return padded_attention_head_dim(head_dim) && mlxs_default_device_is_cuda() ? 1 : 0;
}

mlxs_array* mlxs_padded_attention(const mlxs_array* q, const mlxs_array* k, const mlxs_array* v,
                                  float scale, const mlxs_array* starts) {
  return guard([&] {
    const auto& qa = q->a;
    const int d = qa.ndim() == 4 ? qa.shape(3) : 0;
    if (!padded_attention_head_dim(d) || qa.shape(2) != 1 || k->a.ndim() != 4 ||
        v->a.ndim() != 4 || k->a.shape(0) != qa.shape(0) || k->a.shape(3) != d ||
        v->a.shape() != k->a.shape() || k->a.shape(1) == 0 || qa.shape(1) % k->a.shape(1) != 0 ||
        starts->a.ndim() != 1 || starts->a.shape(0) != qa.shape(0)) {
      throw std::invalid_argument(
          "padded_attention: q [B, H, 1, D] (D a multiple of 32 up to 256), k and v [B, Hkv, N, D] "
          "with H a multiple of Hkv, starts [B]");
    }
    if (!mlxs_padded_attention_available(d)) {
      throw std::runtime_error(
          "padded_attention: needs MLX's CUDA backend with the GPU as default device");
    }
    static const mx::fast::CustomKernelFunction kernel = mx::fast::cuda_kernel(
        "mlxs_padded_attention", {"q", "k", "v", "starts", "scale"}, {"out"}, kPaddedAttention,
        "", /* ensure_row_contiguous= */ false);
    // The kernel reads the last dimension with stride 1.
    auto unit = [](const mx::array& a) { return a.strides().back() == 1 ? a : mx::contiguous(a); };
    return kernel({unit(qa), unit(k->a), unit(v->a), mx::astype(starts->a, mx::int32),
                   mx::array({scale})},
                  {qa.shape()}, {qa.dtype()}, {128 * qa.shape(1), qa.shape(0), 1}, {128, 1, 1},
                  {{"D", d}, {"T", qa.dtype()}}, std::nullopt, false, {})[0];
  });
}

mlxs_array* mlxs_swiglu(const mlxs_array* gate, const mlxs_array* x) {
  static auto compiled = mx::compile(swiglu_impl, /* shapeless= */ true);
  return guard([&] { return compiled({gate->a, x->a})[0]; });
}

mlxs_array* mlxs_random_key(uint64_t seed) {
  return guard([&] { return mx::random::key(seed); });
}

int mlxs_random_split(const mlxs_array* key, mlxs_array** a, mlxs_array** b) {
  return guard_status([&] {
    auto [x, y] = mx::random::split(key->a);
    *a = wrap(x);
    *b = wrap(y);
  });
}

mlxs_array* mlxs_random_categorical(const mlxs_array* logits, int axis, const mlxs_array* key) {
  return guard([&] { return mx::random::categorical(logits->a, axis, key->a); });
}

mlxs_array* mlxs_random_uniform(const int32_t* shape, int ndim, int dtype, const mlxs_array* key) {
  return guard([&] {
    return mx::random::uniform(to_shape(shape, ndim), to_dtype(dtype), key->a);
  });
}

mlxs_safetensors* mlxs_load_safetensors(const char* path) {
  try {
    auto [arrays, metadata] = mx::load_safetensors(std::string(path));
    auto* st = new mlxs_safetensors;
    st->arrays.reserve(arrays.size());
    for (auto& [name, arr] : arrays) st->arrays.emplace_back(name, arr);
    std::sort(st->arrays.begin(), st->arrays.end(),
              [](const auto& x, const auto& y) { return x.first < y.first; });
    st->metadata = std::move(metadata);
    return st;
  } catch (const std::exception& e) {
    set_error(e.what());
  } catch (...) {
    set_error(nullptr);
  }
  return nullptr;
}

size_t mlxs_safetensors_len(const mlxs_safetensors* st) { return st->arrays.size(); }

const char* mlxs_safetensors_name(const mlxs_safetensors* st, size_t i) {
  return st->arrays[i].first.c_str();
}

mlxs_array* mlxs_safetensors_array(const mlxs_safetensors* st, size_t i) {
  return guard([&] { return st->arrays[i].second; });
}

const char* mlxs_safetensors_metadata(const mlxs_safetensors* st, const char* key) {
  auto it = st->metadata.find(key);
  return it == st->metadata.end() ? nullptr : it->second.c_str();
}

void mlxs_safetensors_free(mlxs_safetensors* st) { delete st; }

int mlxs_save_safetensors(const char* path, const char* const* names, mlxs_array* const* arrays,
                          size_t n) {
  return guard_status([&] {
    std::unordered_map<std::string, mx::array> m;
    for (size_t i = 0; i < n; ++i) m.insert_or_assign(names[i], arrays[i]->a);
    mx::save_safetensors(std::string(path), std::move(m));
  });
}

}  // extern "C"
