"""How long MLX takes the first time it runs a quantized product of a new shape, and whether a new
process pays it again.

MLX CUDA compiles some kernels at run time (NVRTC) and keeps the result under MLX_PTX_CACHE_DIR
(default: the temporary directory's mlx/VERSION/ptx). For each number of rows M, in the `[M, k]`
layout a decode step (M streams) or a prefill chunk (M tokens) uses, this times the first call and
the second, then lists the cache. `--child` runs the same rows in a new process to time a warm
cache. Run on the GPU machine by `benches/gpu.sh py benches/gpu/firstcall.py --out $OUT/firstcall.json`.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import mlx.core as mx

SHAPES = {"0.6b gate/up": (3072, 1024), "8b q/o": (4096, 4096)}


def call(x, w, s, b, bits, group):
    t = time.perf_counter()
    mx.eval(mx.quantized_matmul(x, w, s, b, transpose=True, group_size=group, bits=bits))
    mx.synchronize()
    return (time.perf_counter() - t) * 1e3


def cache_dir():
    d = os.environ.get("MLX_PTX_CACHE_DIR")
    return pathlib.Path(d) if d else pathlib.Path(tempfile.gettempdir()) / "mlx" / mx.__version__ / "ptx"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 9, 16, 17, 32, 33, 64, 128, 512, 2048])
    ap.add_argument("--shape", default="0.6b gate/up", choices=list(SHAPES))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--budget-s", type=float, default=200, help="start no new row count after this")
    ap.add_argument("--child", action="store_true", help="also time every row count again in a new process")
    ap.add_argument("--out")
    a = ap.parse_args()
    n, k = SHAPES[a.shape]
    w = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
    wq, s, b = mx.quantize(w, group_size=a.group, bits=a.bits)
    mx.eval(wq, s, b)
    t0 = time.perf_counter()
    rows = []
    print(f"pid {os.getpid()} mlx {mx.__version__} {a.shape} {a.bits}-bit, cache {cache_dir()}", flush=True)
    for m in a.rows:
        if time.perf_counter() - t0 > a.budget_s:
            print(f"budget spent; skipped rows from {m}", flush=True)
            break
        x = (mx.random.normal((m, k)) * 0.1).astype(mx.bfloat16)
        mx.eval(x)
        first = call(x, wq, s, b, a.bits, a.group)
        second = call(x, wq, s, b, a.bits, a.group)
        rows.append({"rows": m, "first_ms": first, "second_ms": second})
        print(f"M={m:5d} first {first:10.1f} ms  second {second:7.3f} ms", flush=True)
    cache = cache_dir()
    files = sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []
    print(f"cache {cache}: {len(files)} files", flush=True)
    for f in files:
        print("  ", f, flush=True)
    result = {"shape": a.shape, "bits": a.bits, "group": a.group, "mlx": mx.__version__, "rows": rows,
              "cache": str(cache), "cache_files": files}
    if a.child:
        args = [sys.executable, __file__, "--shape", a.shape, "--bits", str(a.bits), "--group", str(a.group),
                "--budget-s", str(a.budget_s), "--rows", *[str(r["rows"]) for r in rows]]
        if a.out:
            args += ["--out", a.out + ".child.json"]
        print("a new process, same rows:", flush=True)
        subprocess.run(args, check=False)
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
