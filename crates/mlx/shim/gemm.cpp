// A bfloat16 matrix product for MLX's CPU device that gives exactly MLX's own results, faster.
//
// MLX computes a bfloat16 product on the CPU (outside Apple's Accelerate) with `simd_gemm` at a
// SIMD width of one: every output element is a float32 sum of the products of its row and column,
// added one at a time in order of k, then rounded to bfloat16 once. That order is a long chain of
// dependent additions per element, so the loop runs at the latency of one addition per product.
// Here each output element gets the same chain, in the same order, with the same float32
// operations (the product of two bfloat16 values is exact in float32, and every addition rounds
// as MLX's does), but eight columns of the weights sit side by side in one vector and several rows
// and columns run at once, so the chains advance together. The weights are packed once, at load,
// as [ceil(N / 8), K, 8].
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "internal.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

// Elsewhere (Apple's Accelerate build) MLX sums eight products at a time in a tree, so this
// order would not be its order: the packed product is only offered where it matches.
#if defined(__APPLE__)
#define MLXS_PACKED_GEMM 0
#else
#define MLXS_PACKED_GEMM 1
#endif

namespace {

constexpr int LANES = 8;

// Inlined into each clone of gemm_bf16, so each runs with that clone's instruction set.
#define MLXS_INLINE inline __attribute__((always_inline))

typedef float v8f __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));

MLXS_INLINE float bf16_to_float(uint16_t bits) {
  uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

MLXS_INLINE v8f load_bf16x8(const uint16_t* p) {
  v8u16 h;
  std::memcpy(&h, p, sizeof h);
  v8u32 u = __builtin_convertvector(h, v8u32) << 16;
  v8f f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

MLXS_INLINE uint16_t float_to_bf16(float x) {
  // MLX's conversion: round to nearest even, NaN to its canonical NaN.
  return mx::bfloat16_t(x).bits_;
}

// Rows [r0, r0 + R) and column groups [g0, g0 + GG) of out = x w^T (+ bias).
template <int R, int GG>
MLXS_INLINE void tile(
    const float* x,
    const uint16_t* wp,
    const uint16_t* bias,
    uint16_t* out,
    int K,
    int N,
    int r0,
    int g0) {
  v8f acc[R][GG];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < GG; ++g) acc[r][g] = v8f{};
  const float* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = x + size_t(r0 + r) * K;
  const uint16_t* wg[GG];
  for (int g = 0; g < GG; ++g) wg[g] = wp + size_t(g0 + g) * K * LANES;
  for (int k = 0; k < K; ++k) {
    v8f w[GG];
    for (int g = 0; g < GG; ++g) w[g] = load_bf16x8(wg[g] + size_t(k) * LANES);
    for (int r = 0; r < R; ++r) {
      float a = xr[r][k];
      for (int g = 0; g < GG; ++g) {
        v8f p = a * w[g];
        acc[r][g] = acc[r][g] + p;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    uint16_t* o = out + size_t(r0 + r) * N;
    for (int g = 0; g < GG; ++g) {
      for (int l = 0; l < LANES; ++l) {
        int j = (g0 + g) * LANES + l;
        if (j >= N) break;
        float v = acc[r][g][l];
        if (bias) v = v + bf16_to_float(bias[j]);
        o[j] = float_to_bf16(v);
      }
    }
  }
}

template <int R>
MLXS_INLINE void rows(const float* x, const uint16_t* wp, const uint16_t* bias, uint16_t* out, int K, int N, int r0) {
  int groups = (N + LANES - 1) / LANES;
  int g = 0;
  for (; g + 2 <= groups; g += 2) tile<R, 2>(x, wp, bias, out, K, N, r0, g);
  if (g < groups) tile<R, 1>(x, wp, bias, out, K, N, r0, g);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx2", "default")))
#endif
void gemm_bf16(const uint16_t* x16, const uint16_t* wp, const uint16_t* bias, uint16_t* out, int M, int K, int N) {
  std::vector<float> x(size_t(M) * K);
  for (size_t i = 0; i < x.size(); ++i) x[i] = bf16_to_float(x16[i]);
  int r = 0;
  for (; r + 4 <= M; r += 4) rows<4>(x.data(), wp, bias, out, K, N, r);
  switch (M - r) {
    case 3: rows<3>(x.data(), wp, bias, out, K, N, r); break;
    case 2: rows<2>(x.data(), wp, bias, out, K, N, r); break;
    case 1: rows<1>(x.data(), wp, bias, out, K, N, r); break;
    default: break;
  }
}

class PackedMatmul : public mx::UnaryPrimitive {
 public:
  PackedMatmul(mx::Stream stream, int n, bool bias) : mx::UnaryPrimitive(stream), n_(n), bias_(bias) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& x = inputs[0];
    const auto& wp = inputs[1];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    int K = x.shape(-1);
    int M = K > 0 ? int(x.size() / K) : 0;
    int N = n_;
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(wp);
    const uint16_t* bias = nullptr;
    if (bias_) {
      encoder.set_input_array(inputs[2]);
      bias = reinterpret_cast<const uint16_t*>(inputs[2].data<mx::bfloat16_t>());
    }
    encoder.set_output_array(out);
    encoder.dispatch([x16 = reinterpret_cast<const uint16_t*>(x.data<mx::bfloat16_t>()),
                      w = reinterpret_cast<const uint16_t*>(wp.data<mx::bfloat16_t>()),
                      bias,
                      o = reinterpret_cast<uint16_t*>(out.data<mx::bfloat16_t>()),
                      M, K, N]() { gemm_bf16(x16, w, bias, o, M, K, N); });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("the packed bfloat16 matmul runs on the CPU only");
  }

  const char* name() const override { return "PackedMatmul"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const PackedMatmul&>(other);
    return n_ == o.n_ && bias_ == o.bias_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.back() = n_;
    return {shape};
  }

 private:
  int n_;
  bool bias_;
};

}  // namespace

extern "C" {

int mlxs_packed_matmul_supported(void) { return MLXS_PACKED_GEMM; }

mlxs_array* mlxs_pack_weight(const mlxs_array* w) {
  return guard([&] {
    const auto& a = w->a;
    if (a.ndim() != 2 || a.dtype() != mx::bfloat16) {
      throw std::invalid_argument("pack_weight: a 2-D bfloat16 weight [out, in] is needed");
    }
    int n = a.shape(0), k = a.shape(1);
    int padded = (n + LANES - 1) / LANES * LANES;
    auto p = padded > n ? mx::pad(a, {{0, padded - n}, {0, 0}}) : a;
    p = mx::transpose(mx::reshape(p, {padded / LANES, LANES, k}), {0, 2, 1});
    return mx::contiguous(p);
  });
}

mlxs_array* mlxs_packed_matmul(const mlxs_array* x, const mlxs_array* packed, int n, const mlxs_array* bias) {
  return guard([&]() -> mx::array {
    if (!MLXS_PACKED_GEMM) {
      throw std::runtime_error("the packed bfloat16 matmul is not available on this platform");
    }
    const auto& p = packed->a;
    if (p.ndim() != 3 || p.shape(2) != LANES || p.dtype() != mx::bfloat16 || n <= 0 ||
        (n + LANES - 1) / LANES != p.shape(0)) {
      throw std::invalid_argument("packed_matmul: not a packed weight of " + std::to_string(n) + " outputs");
    }
    auto in = x->a;
    if (in.dtype() != mx::bfloat16 || in.ndim() < 1 || in.shape(-1) != p.shape(1)) {
      throw std::invalid_argument("packed_matmul: the input must be bfloat16 with " +
                                  std::to_string(p.shape(1)) + " features in its last axis");
    }
    auto stream = mx::default_stream(mx::Device::cpu);
    std::vector<mx::array> inputs{mx::contiguous(in, false, stream), p};
    if (bias) {
      if (bias->a.dtype() != mx::bfloat16 || bias->a.ndim() != 1 || bias->a.shape(0) != n) {
        throw std::invalid_argument("packed_matmul: the bias must be bfloat16 [" + std::to_string(n) + "]");
      }
      inputs.push_back(mx::contiguous(bias->a, false, stream));
    }
    auto shape = in.shape();
    shape.back() = n;
    return mx::array(shape, mx::bfloat16, std::make_shared<PackedMatmul>(stream, n, bias != nullptr), inputs);
  });
}

}  // extern "C"
