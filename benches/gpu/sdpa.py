"""Decode-step attention with a padding mask, on MLX's default device: is it right, and what does it cost?

A batched decode step attends one new position per row over a KV cache whose rows are left-padded
to a common length; the worker passes a boolean mask [rows, 1, 1, columns] (false on padding). For
each number of rows this script
  - checks fast.scaled_dot_product_attention with that mask against attention computed in
    float32 from the same inputs (and shows the error the unmasked call would have, so that a
    kernel ignoring the mask is seen);
  - checks the shim's padded-attention kernel (crates/mlx/shim/padded_attention.inc, on MLX CUDA
    only) the same way;
  - times one step's worth of attention calls (one per layer): with the mask, without it, with
    the mask applied as an additive bias, composed from two folded matmuls (`folded` below),
    and through the kernel; each as host time to build and submit (async_eval) and as wall
    time to finish.
Run on the GPU machine by `benches/gpu.sh py benches/gpu/sdpa.py`.
"""
import argparse
import json
import time

import mlx.core as mx

from kernel_check import kernel_body


def padded_kernel():
    """The shim's padded decode-attention kernel for MLX CUDA, from its source file, or None off CUDA."""
    if not (mx.default_device() == mx.gpu and mx.cuda.is_available()):
        return None
    return mx.fast.cuda_kernel(name="padded_attention", input_names=["q", "k", "v", "starts", "scale"],
                               output_names=["out"], source=kernel_body(), ensure_row_contiguous=False)


def kernel_attention(kern, q, k, v, starts, scale):
    b, h, _, d = q.shape
    return kern(inputs=[q, k, v, starts, mx.array([scale], dtype=mx.float32)],
                template=[("D", d), ("T", q.dtype)], grid=(128 * h, b, 1), threadgroup=(128, 1, 1),
                output_shapes=[q.shape], output_dtypes=[q.dtype])[0]


def reference(q, k, v, mask, scale):
    """float32 attention with grouped heads: q [b, h, 1, d], k/v [b, hkv, l, d], mask [b, 1, 1, l]."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    qf = q.astype(mx.float32).reshape(b, hkv, h // hkv, 1, d)
    kf = k.astype(mx.float32)[:, :, None]
    vf = v.astype(mx.float32)[:, :, None]
    s = (qf * scale) @ kf.swapaxes(-1, -2)
    if mask is not None:
        s = mx.where(mask[:, :, None], s, -mx.inf)
    p = mx.softmax(s, axis=-1)
    return (p @ vf).reshape(b, h, 1, d)


def folded(q, k, v, mask, scale):
    """Masked decode attention from two matmuls whose batch is one folded dimension (rows x kv
    heads), so that no product has more than one batch dimension: a candidate replacement for the
    masked fused call, in the inputs' dtype with a float32 softmax."""
    b, h, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    q3 = (q * scale).reshape(b * hkv, h // hkv, d)
    k3 = k.reshape(b * hkv, n, d)
    v3 = v.reshape(b * hkv, n, d)
    s = (q3 @ k3.swapaxes(-1, -2)).reshape(b, hkv, h // hkv, n)
    s = mx.where(mask, s, mx.array(-mx.inf, s.dtype))
    p = mx.softmax(s.astype(mx.float32), axis=-1).astype(q.dtype).reshape(b * hkv, h // hkv, n)
    return (p @ v3).reshape(b, h, 1, d)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--columns", type=int, default=256, help="cache columns attended to")
    ap.add_argument("--capacity", type=int, default=512, help="cache buffer columns (the keys are a slice)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out")
    a = ap.parse_args()
    print(f"device {mx.default_device()}, mlx {mx.__version__}", flush=True)
    scale = a.head_dim ** -0.5
    results = []
    kern = padded_kernel()
    names = ("mask", "none", "bias", "folded") + (("kernel",) if kern else ())
    print("| rows | max error: masked / folded / kernel | max error had the mask been ignored | host ms per step: "
          + " / ".join(names) + " | wall ms per step: " + " / ".join(names) + " |")
    print("|---|---|---|---|---|")
    for rows in a.rows:
        q = mx.random.normal((rows, a.heads, 1, a.head_dim)).astype(mx.bfloat16)
        kbuf = mx.random.normal((rows, a.kv_heads, a.capacity, a.head_dim)).astype(mx.bfloat16)
        vbuf = mx.random.normal((rows, a.kv_heads, a.capacity, a.head_dim)).astype(mx.bfloat16)
        k, v = kbuf[:, :, : a.columns], vbuf[:, :, : a.columns]
        # Row i is padded by 7 * i columns (at most half the columns).
        pads = [min(7 * i, a.columns // 2) for i in range(rows)]
        mask = mx.array([[c >= p for c in range(a.columns)] for p in pads]).reshape(rows, 1, 1, a.columns)
        bias = mx.where(mask, 0.0, -mx.inf).astype(mx.bfloat16)
        mx.eval(q, kbuf, vbuf, mask, bias)
        ref = reference(q, k, v, mask, scale)
        got = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        unmasked = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
        err = mx.abs(got.astype(mx.float32) - ref).max().item()
        err_folded = mx.abs(folded(q, k, v, mask, scale).astype(mx.float32) - ref).max().item()
        starts = mx.array(pads, dtype=mx.int32)
        err_kernel = (mx.abs(kernel_attention(kern, q, k, v, starts, scale).astype(mx.float32) - ref).max().item()
                      if kern else float("nan"))
        err_ignored = mx.abs(unmasked.astype(mx.float32) - ref).max().item() if max(pads) else 0.0

        def step(name):
            # One attention per layer, each on its own query so none is shared.
            if name == "folded":
                return [folded(q + i, k, v, mask, scale) for i in range(a.layers)]
            if name == "kernel":
                return [kernel_attention(kern, q + i, k, v, starts, scale) for i in range(a.layers)]
            m = {"mask": mask, "none": None, "bias": bias}[name]
            return [mx.fast.scaled_dot_product_attention(q + i, k, v, scale=scale, mask=m) for i in range(a.layers)]

        timing = {}
        for name in names:
            mx.eval(step(name))  # warm-up
            host, wall = [], []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                outs = step(name)
                mx.async_eval(outs)
                t1 = time.perf_counter()
                mx.eval(outs)
                t2 = time.perf_counter()
                host.append((t1 - t0) * 1e3)
                wall.append((t2 - t0) * 1e3)
            host.sort()
            wall.sort()
            timing[name] = {"host_ms": host[len(host) // 2], "wall_ms": wall[len(wall) // 2]}
        results.append({"rows": rows, "pads": pads, "max_error": err, "max_error_folded": err_folded, "max_error_kernel": err_kernel, "max_error_mask_ignored": err_ignored, **timing})
        print(f"| {rows} | {err:.4f} / {err_folded:.4f} / {err_kernel:.4f} | {err_ignored:.4f} | "
              + " / ".join(f"{timing[n]['host_ms']:.2f}" for n in names) + " | "
              + " / ".join(f"{timing[n]['wall_ms']:.2f}" for n in names) + " |", flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"device": str(mx.default_device()), "mlx": mx.__version__, "args": vars(a), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
