"""Host time to submit one decode step's operations, per operation kind and number of rows.

On a GPU, MLX's `async_eval` encodes and launches every kernel of a graph on the calling thread,
so a decode step costs host time per operation even when the GPU is idle. This script times that
host cost (the `async_eval` call alone, on inputs already evaluated) for the operations a
decode step of a qwen3-0.6B-shaped model is made of, at several numbers of rows, to find which
operation costs more host time as a batch grows. Each measurement submits `--layers`
independent operations of one kind; the table gives microseconds per operation, host and wall.

Run on the GPU machine by `benches/gpu.sh py benches/gpu/hostcost.py`.
"""
import argparse
import json
import time

import mlx.core as mx


def kinds(rows, a):
    """name -> (inputs per operation, function of one input tuple)."""
    h, inter, heads, kvh, hd, cols = a.hidden, a.intermediate, a.heads, a.kv_heads, a.head_dim, a.columns
    bf = mx.bfloat16
    w = mx.random.normal((inter, h)).astype(bf) * 0.02
    wq, sq, bq = mx.quantize(w, group_size=64, bits=4)
    wd = mx.random.normal((h, inter)).astype(bf) * 0.02
    wdq, sdq, bdq = mx.quantize(wd, group_size=64, bits=4)
    mx.eval(w, wq, sq, bq, wdq, sdq, bdq)
    pads = [min(7 * i, cols // 2) for i in range(rows)]
    mask = mx.array([[c >= p for c in range(cols)] for p in pads]).reshape(rows, 1, 1, cols)
    offsets = mx.array([cols - p for p in pads], dtype=mx.int32)
    mx.eval(mask, offsets)

    def x2():
        return (mx.random.normal((rows, h)).astype(bf),)

    def x3():
        return (mx.random.normal((rows, 1, h)).astype(bf),)

    def xi():
        return (mx.random.normal((rows, 1, inter)).astype(bf),)

    def qkv():
        return (mx.random.normal((rows, heads, 1, hd)).astype(bf),
                mx.random.normal((rows, kvh, cols, hd)).astype(bf),
                mx.random.normal((rows, kvh, cols, hd)).astype(bf))

    def kv_buf():
        return (mx.zeros((rows, kvh, cols + 16, hd), dtype=bf), mx.random.normal((rows, kvh, 1, hd)).astype(bf))

    def logits():
        return (mx.random.normal((rows, a.vocab)).astype(bf),)

    scale = hd ** -0.5
    return {
        "qmm up [rows,k]": (x2, lambda x: mx.quantized_matmul(x, wq, sq, bq, transpose=True, group_size=64, bits=4)),
        "qmm up [rows,1,k]": (x3, lambda x: mx.quantized_matmul(x, wq, sq, bq, transpose=True, group_size=64, bits=4)),
        "qmm up folded": (x3, lambda x: mx.quantized_matmul(x.reshape(rows, h), wq, sq, bq, transpose=True,
                                                             group_size=64, bits=4).reshape(rows, 1, inter)),
        "qmm down [rows,1,k]": (xi, lambda x: mx.quantized_matmul(x, wdq, sdq, bdq, transpose=True, group_size=64, bits=4)),
        "qmm down folded": (xi, lambda x: mx.quantized_matmul(x.reshape(rows, inter), wdq, sdq, bdq, transpose=True,
                                                               group_size=64, bits=4).reshape(rows, 1, h)),
        "matmul bf16 [rows,1,k]": (x3, lambda x: x @ w.T),
        "rms_norm": (x3, lambda x: mx.fast.rms_norm(x, None, 1e-6)),
        "silu*mul": (xi, lambda x: mx.sigmoid(x) * x * x),
        "rope scalar offset": (lambda: qkv()[:1], lambda q: mx.fast.rope(q, hd, traditional=False, base=1e6, scale=1.0, offset=cols)),
        "rope array offset": (lambda: qkv()[:1], lambda q: mx.fast.rope(q, hd, traditional=False, base=1e6, scale=1.0, offset=offsets)),
        "transpose+reshape out": (lambda: qkv()[:1], lambda o: o.transpose(0, 2, 1, 3).reshape(rows, 1, heads * hd)),
        "sdpa no mask": (qkv, lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)),
        "sdpa bool mask": (qkv, lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)),
        "kv slice_update": (kv_buf, lambda buf, new: mx.slice_update(buf, new, mx.array([cols]), axes=(2,))),
        "logsumexp+argmax": (logits, lambda l: mx.argmax(l - mx.logsumexp(l, axis=-1, keepdims=True), axis=-1)),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 32])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3072)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--columns", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--layers", type=int, default=28, help="operations of a kind per submission")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out")
    a = ap.parse_args()
    print(f"device {mx.default_device()}, mlx {mx.__version__}", flush=True)
    results = {}
    for rows in a.rows:
        for name, (make, op) in kinds(rows, a).items():
            n = a.layers if not name.startswith("logsumexp") else 1
            host, wall = [], []
            for rep in range(a.reps + 1):
                inputs = [make() for _ in range(n)]
                mx.eval(inputs)
                outs = [op(*x) for x in inputs]
                t0 = time.perf_counter()
                mx.async_eval(outs)
                t1 = time.perf_counter()
                mx.eval(outs)
                t2 = time.perf_counter()
                if rep:  # the first is a warm-up (kernel compilation)
                    host.append((t1 - t0) * 1e6 / n)
                    wall.append((t2 - t0) * 1e6 / n)
            host.sort()
            wall.sort()
            results.setdefault(name, {})[rows] = {"host_us": host[len(host) // 2], "wall_us": wall[len(wall) // 2]}
        print(f"rows {rows} done", flush=True)
    print(f"\nmicroseconds per operation, host (async_eval) / wall; {a.layers} operations per submission")
    print("| operation | " + " | ".join(f"{r} rows" for r in a.rows) + " |")
    print("|---|" + "---|" * len(a.rows))
    for name, by_rows in results.items():
        print(f"| {name} | " + " | ".join(f"{by_rows[r]['host_us']:.1f} / {by_rows[r]['wall_us']:.1f}" for r in a.rows) + " |")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"device": str(mx.default_device()), "mlx": mx.__version__, "args": vars(a), "results": results},
                      fh, indent=1)


if __name__ == "__main__":
    main()
