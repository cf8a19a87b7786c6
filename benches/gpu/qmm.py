"""Quantized matmul against dequantize-then-matmul, per batch size, on MLX's default device.

For each weight shape of the benchmark models (4-bit and 8-bit, group 64) and each number of rows M
(the sequences of a decode step, or a prompt's tokens), it times
  - quantized_matmul(x, w_q, ...)                         x as [M, k], and as [M, 1, k] (M
                                                           sequences of one decode step);
  - matmul(x, dequantize(w_q, ...).T)                      the weight expanded for this one call;
  - matmul(x, w.T) on the bf16 weight                      the dense reference.
It prints a table and writes JSON (--out). Run on the GPU machine by `benches/gpu.sh py benches/gpu/qmm.py`.
"""
import argparse
import json
import time

import mlx.core as mx

SHAPES = {
    # (out, in): llama3 8B's q|o, k|v, gate|up and down projections, qwen3 0.6B's.
    "8b q/o 4096x4096": (4096, 4096),
    "8b gate/up 14336x4096": (14336, 4096),
    "8b down 4096x14336": (4096, 14336),
    "0.6b gate/up 3072x1024": (3072, 1024),
    "0.6b down 1024x3072": (1024, 3072),
    "0.6b lm_head 151936x1024": (151936, 1024),
}


def timed(fn, reps):
    """Median of `reps` rounds; each round evaluates 8 independent calls, timed per call."""
    outs = [fn(i) for i in range(8)]
    mx.eval(outs)  # warm-up: kernels compiled, buffers in MLX's cache
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval([fn(i) for i in range(8)])
        samples.append((time.perf_counter() - t) / 8 * 1e3)
    samples.sort()
    return samples[len(samples) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--shapes", nargs="+", default=["8b gate/up 14336x4096", "0.6b gate/up 3072x1024"],
                    choices=list(SHAPES))
    ap.add_argument("--out")
    a = ap.parse_args()
    print(f"device {mx.default_device()}, mlx {mx.__version__}", flush=True)
    results = []
    t0 = time.perf_counter()
    print("| shape | bits | M | quantized_matmul [M, k] ms | quantized_matmul [M, 1, k] ms | dequantize+matmul ms | bf16 matmul ms | elapsed s |")
    print("|---|---|---|---|---|---|---|---|")
    for sname in a.shapes:
        n, k = SHAPES[sname]
        w = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
        mx.eval(w)
        for bits in a.bits:
            wq, s, b = mx.quantize(w, group_size=a.group, bits=bits)
            mx.eval(wq, s, b)
            for m in a.rows:
                xs = [mx.random.normal((m, k)).astype(mx.bfloat16) for _ in range(8)]
                mx.eval(xs)
                q = timed(lambda i: mx.quantized_matmul(xs[i], wq, s, b, transpose=True,
                                                        group_size=a.group, bits=bits), a.reps)
                qb = timed(lambda i: mx.quantized_matmul(xs[i][:, None, :], wq, s, b, transpose=True,
                                                         group_size=a.group, bits=bits), a.reps)
                d = timed(lambda i: xs[i] @ mx.dequantize(wq, s, b, group_size=a.group, bits=bits).T, a.reps)
                f = timed(lambda i: xs[i] @ w.T, a.reps)
                results.append({"shape": sname, "n": n, "k": k, "bits": bits, "m": m,
                                 "qmm_ms": q, "qmm_batched_ms": qb, "dequant_mm_ms": d, "dense_ms": f})
                print(f"| {sname} | {bits} | {m} | {q:.3f} | {qb:.3f} | {d:.3f} | {f:.3f} | {time.perf_counter() - t0:.0f} |", flush=True)
            del wq, s, b
        del w
        mx.clear_cache()
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"device": str(mx.default_device()), "mlx": mx.__version__, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
