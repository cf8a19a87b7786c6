"""Compiles the shim's CUDA kernel sources with NVRTC here, without a GPU, before device time is spent.

MLX compiles a custom kernel (fast::cuda_kernel) at run time on the GPU machine, so a typo in
crates/mlx/shim/padded_attention.inc would only show there. This script wraps the kernel body the
way MLX does (inputs as pointers, `NAME_shape` / `NAME_strides` when used, the template arguments
as constants) with stand-ins for MLX's Shape and Strides, and compiles it for each dtype and a few
head sizes. `benches/gpu.sh prepare` runs it; it needs NVIDIA's NVRTC and CUDA headers:

    python3 benches/gpu/kernel_check.py --nvrtc DIR/libnvrtc.so.13 --include DIR/include
"""
import argparse
import ctypes
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "crates/mlx/shim/padded_attention.inc"
INPUTS = ["q", "k", "v", "starts", "scale"]
TYPES = {"bfloat16": "__nv_bfloat16", "float16": "__half", "float32": "float"}

PRELUDE = """
#include <cuda_bf16.h>
#include <cuda_fp16.h>
using int64_t = long long;
using int32_t = int;
struct Shape { int32_t v[10]; __device__ const int32_t& operator[](int i) const { return v[i]; } };
struct Strides { int64_t v[10]; __device__ const int64_t& operator[](int i) const { return v[i]; } };
"""


def kernel_body():
    """The kernel's source as MLX's custom kernels take it: the body between the raw-string marks."""
    text = SOURCE.read_text()
    return text[text.index('R"cuda(') + len('R"cuda('): text.rindex(')cuda"')]


def wrapped(body, dtype, d):
    t = TYPES[dtype]
    types = {"q": t, "k": t, "v": t, "starts": "int32_t", "scale": "float"}
    params = []
    for name in INPUTS:
        params.append(f"const {types[name]}* {name}")
        if f"{name}_shape" in body:
            params.append(f"const __grid_constant__ Shape {name}_shape")
        if f"{name}_strides" in body:
            params.append(f"const __grid_constant__ Strides {name}_strides")
    params.append(f"{t}* out")
    return (PRELUDE + f"__global__ void padded_attention({', '.join(params)}) {{\n"
            + f"  constexpr int D = {d};\n  using T = {t};\n" + body + "\n}\n")


def compile_source(lib, src, include):
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"padded_attention.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [f"-I{include}".encode(), b"--std=c++17", b"-arch=compute_90", b"-default-device"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nvrtc", required=True, help="libnvrtc.so.13 (its builtins library beside it)")
    ap.add_argument("--include", required=True, help="CUDA's include directory (cuda_bf16.h, cuda_fp16.h)")
    a = ap.parse_args()
    body = kernel_body()
    lib = ctypes.CDLL(a.nvrtc)
    failed = 0
    for dtype in TYPES:
        for d in (64, 128, 256):
            rc, log = compile_source(lib, wrapped(body, dtype, d), a.include)
            if rc:
                failed += 1
                print(f"{SOURCE.name}: {dtype}, D={d}: does not compile\n{log}", file=sys.stderr)
    if failed:
        sys.exit(1)
    print(f"{SOURCE.name}: compiles for {', '.join(TYPES)} at D = 64, 128, 256")


if __name__ == "__main__":
    main()
