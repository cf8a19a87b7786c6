"""Which order of operations MLX's CPU quantized product follows, found by emulating candidates.

For random bfloat16 inputs and 4-bit weights (group 64) it computes `mx.quantized_matmul` on the
CPU and, in numpy, three candidate computations of every output, and prints how many outputs of
each equal MLX's bit for bit:
- `bf16-every-op`: one chain per output in order of k, every operation rounded to bfloat16
  (w = scale * q + bias, then x * w, then acc + that);
- `f32-acc-bf16-w`: the weight rounded to bfloat16, the sum kept in float32;
- `f32-all`: everything in float32, rounded once at the end.
A product of our own that gives MLX's results on the CPU has to follow the order that matches
(as crates/mlx/shim/gemm.cpp does for bfloat16 products).

    .venv-bench/bin/python benches/qmm_cpu_order.py
"""
import mlx.core as mx, numpy as np
mx.set_default_device(mx.cpu)
rng = np.random.default_rng(0)
def bf(x):  # round float32 array to bf16 (RNE), returned as float32
    a = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((a + 0x7FFF + ((a >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)
K, N, M, G, B = 256, 64, 3, 64, 4
w = mx.array(rng.normal(0, 0.08, (N, K)).astype(np.float32)).astype(mx.bfloat16)
x = mx.array(rng.normal(0, 1, (M, K)).astype(np.float32)).astype(mx.bfloat16)
wq, s, b = mx.quantize(w, group_size=G, bits=B)
y = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=G, bits=B).astype(mx.float32)
y = np.array(y)
xf = np.array(x.astype(mx.float32)); sf = np.array(s.astype(mx.float32)); bfz = np.array(b.astype(mx.float32))
wi = np.array(wq).astype(np.uint64)
ints = np.zeros((N, K), np.float32)
pf = 32 // B
for n in range(N):
    for j in range(K // pf):
        v = int(wi[n, j])
        for p in range(pf):
            ints[n, j * pf + p] = (v >> (B * p)) & ((1 << B) - 1)
def cand(mode):
    out = np.zeros((M, N), np.float32)
    for m in range(M):
        for n in range(N):
            acc = np.float32(0)
            for k in range(K):
                g = k // G
                if mode == "bf16-every-op":
                    wv = bf(bf(np.float32(sf[n, g]) * ints[n, k]) + bfz[n, g])
                    acc = bf(acc + bf(xf[m, k] * wv))
                elif mode == "f32-acc-bf16-w":
                    wv = bf(bf(np.float32(sf[n, g]) * ints[n, k]) + bfz[n, g])
                    acc = np.float32(acc + np.float32(xf[m, k] * wv))
                elif mode == "f32-all":
                    wv = np.float32(np.float32(sf[n, g]) * ints[n, k] + bfz[n, g])
                    acc = np.float32(acc + np.float32(xf[m, k] * wv))
            out[m, n] = bf(acc)
    return out
for mode in ["bf16-every-op", "f32-acc-bf16-w", "f32-all"]:
    c = cand(mode)
    print(mode, "equal:", int((c == y).sum()), "of", y.size, "max abs diff", float(np.abs(c - y).max()))
