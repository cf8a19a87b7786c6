#!/usr/bin/env bash
# mlx-serving-worker against mlx-lm on an NVIDIA GPU through MLX CUDA (docs/benchmarks-gpu.md).
#
# The GPU machine has CUDA but no MLX, no Rust and no network; MLX for CUDA travels as in
# ../shared/gpu/README.md, split over two calls of the device tool made back to back (the machine
# stays warm 30 s between them). Here, in the repository root:
#
#   bash benches/gpu.sh prepare          # .gpu/p1, .gpu/p2 (shared/gpu/prepare.sh) and .gpu/x1
#   device call 1, carry [".gpu/p1", ".gpu/x1"]:   bash benches/gpu.sh stash
#   device call 2, carry [".gpu/p2", ".gpu/x2"], timeout 600: bash benches/gpu.sh run [bench.py arguments]
#   more calls while the machine is still warm (within 30 s) need no new call 1, e.g.
#   GPU_BENCH_SECONDS=410 bash benches/gpu.sh run --models llama3-8b-q4
# Batch-1 decode variants (stacked projections or not, MLX_MAX_OPS_PER_BUFFER) and operation counts:
#   bash benches/gpu.sh run --variants --step-ops /tmp/step_ops --models qwen3-0.6b-bf16 llama3-8b-bf16
# The pool through the supervisor (1 and 2 workers on the one GPU, side by side; call 2 carries
# .gpu/x4 instead of .gpu/x2):
#   bash benches/gpu.sh run --pool --models qwen3-0.6b-bf16 llama3-8b-bf16 --levels 1 8 32
# and on the 2-GPU kind (nvidia-h200-x2), one worker per GPU:
#   bash benches/gpu.sh run --pool --pool-cuda-devices 0 1 --models qwen3-0.6b-bf16 llama3-8b-bf16 --levels 1 8 32 128
# A device timeline of one batch-1 decode per engine (CUPTI; call 2 carries .gpu/x3 instead of .gpu/x2):
#   bash benches/gpu.sh run --trace /tmp/cupti/libcupti_trace.so --models qwen3-0.6b-bf16 llama3-8b-bf16
# Device timelines of the engine's decode steps at a number of rows (step_ops; call 2 carries .gpu/x2
# and .gpu/x3, models made by bench_models.py):
#   bash benches/gpu.sh sh bash benches/gpu/steptrace.sh \$OUT/steptrace /tmp/m/qwen3-0.6b-q4:32:ragged /tmp/m/qwen3-0.6b-q4:1
#
# A Python script against MLX CUDA (same call 2, after call 1):
#   bash benches/gpu.sh py benches/gpu/qmm.py --out \$OUT/qmm.json
#   bash benches/gpu.sh py benches/gpu/sdpa.py --out \$OUT/sdpa.json   (padding-masked decode attention)
#   bash benches/gpu.sh py benches/gpu/hostcost.py --out \$OUT/hostcost.json   (host time per operation)
#   bash benches/gpu.sh py benches/gpu/firstcall.py --child --out \$OUT/firstcall.json   (first-call kernel compiles)
# The pool on an empty kernel cache with the default timeouts, with and without the worker's
# warm-up (call 2 carries .gpu/x4; a model made by bench_models.py):
#   bash benches/gpu.sh sh python3 benches/gpu/coldstart.py --model /tmp/m/qwen3-0.6b-q4 --out \$OUT/coldstart.json
# Any command there, e.g. the operation counter on a model made by bench_models.py:
#   bash benches/gpu.sh sh /tmp/step_ops /tmp/models/qwen3-0.6b-q4 8 ragged time
# Everything (4 models, 4 levels, parity) takes about 15 minutes on an H200, more than one 10-minute
# call: bench.py skips what its time budget cannot fit and says so (docs/benchmarks-gpu.md).
#
# Call 2 writes results.json, table.md and log.txt under $OUT. A local dry run on the CPU with tiny
# models (needs mlx-lm in PY's environment):
#   PY=.venv-bench/bin/python bash benches/gpu.sh local
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
stash=/root/mlx-gpu
# MLX for CUDA and mlx-lm from the stash and .gpu/p2 (shared/gpu/README.md), into this shell.
mlx_cuda() {
  cp $stash/nvidia_cutlass-*.whl .gpu/p2/
  # shellcheck disable=SC1091
  set +eu; source .gpu/p2/setup.sh; local rc=$?; set -eu; [ $rc -eq 0 ] || exit $rc
}
# The worker from the stash (call 1), and the binaries this call carries (.gpu/x2: the operation
# counter; .gpu/x4: the supervisor), to /tmp.
unpack() {
  [ -f $stash/mlx-serving-worker.xz ] || { echo "stash missing: the machine went cold; redo call 1" >&2; exit 3; }
  for f in $stash/mlx-serving-worker.xz .gpu/x2/step_ops.xz .gpu/x4/mlx-serving.xz; do
    b=$(basename "$f" .xz)
    [ ! -f "$f" ] || { xz -dc "$f" > /tmp/$b && chmod +x /tmp/$b; }
  done
}
case "${1:-}" in
prepare)
  grep -qx '/.gpu/' .git/info/exclude || echo /.gpu/ >> .git/info/exclude
  [ -f .gpu/p1/libmlx.part.aa ] || bash ../shared/gpu/prepare.sh
  export MLX_PYTHON=${MLX_PYTHON:-$root/.venv/bin/python}
  cargo build --release --locked --bins -p mlx-serving-worker -p mlx-serving >&2
  cargo build --release --locked -p mlx-serving-engine --example step_ops >&2
  # One call may carry 64 MiB with the working tree (about 21 MB): the cutlass wheel and the
  # worker (stripped, xz) go with call 1, which stashes them beside part 1 of libmlx.so.
  mkdir -p .gpu/x1
  [ ! -f .gpu/p2/nvidia_cutlass-4.2.0.0-py3-none-any.whl ] || mv .gpu/p2/nvidia_cutlass-*.whl .gpu/x1/
  strip --strip-unneeded -o .gpu/x1/mlx-serving-worker target/release/mlx-serving-worker
  xz -T0 -6 -f .gpu/x1/mlx-serving-worker
  # The operation counter goes with call 2 (bench.py --step-ops /tmp/step_ops; gpu.sh sh).
  mkdir -p .gpu/x2 .gpu/x4
  rm -f .gpu/x1/step_ops.xz .gpu/x2/mlx-serving.xz
  strip --strip-unneeded -o .gpu/x2/step_ops target/release/examples/step_ops
  xz -T0 -6 -f .gpu/x2/step_ops
  # The supervisor, for the pool measurement (--pool): call 2 then carries .gpu/x4 instead of
  # .gpu/x2, which together would pass the 64 MiB.
  strip --strip-unneeded -o .gpu/x4/mlx-serving target/release/mlx-serving
  xz -T0 -6 -f .gpu/x4/mlx-serving
  # The timeline recorder (benches/gpu/cupti_trace.cpp) and NVIDIA's CUPTI, for --trace.
  mkdir -p .gpu/dl-cupti .gpu/x3
  [ -n "$(ls .gpu/dl-cupti/nvidia_cuda_crt-*.whl 2>/dev/null)" ] || pip download -q --no-deps -d .gpu/dl-cupti \
    "nvidia-cuda-cupti==13.0.85" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-crt==13.0.88"
  [ -n "$(ls .gpu/dl-cupti/nvidia_cuda_nvrtc-*.whl 2>/dev/null)" ] || pip download -q --no-deps -d .gpu/dl-cupti \
    "nvidia-cuda-nvrtc==13.0.88"
  cu=.gpu/dl-cupti/x; rm -rf $cu; mkdir -p $cu
  for w in .gpu/dl-cupti/*.whl; do python3 -m zipfile -e "$w" $cu; done
  # The shim's CUDA kernel, compiled here with NVRTC: MLX compiles it only on the GPU machine.
  LD_LIBRARY_PATH=$cu/nvidia/cu13/lib python3 benches/gpu/kernel_check.py \
    --nvrtc $cu/nvidia/cu13/lib/libnvrtc.so.13 --include $cu/nvidia/cu13/include
  g++ -O2 -std=c++17 -shared -fPIC -I$cu/nvidia/cu13/include benches/gpu/cupti_trace.cpp -o .gpu/x3/libcupti_trace.so \
    -L$cu/nvidia/cu13/lib -l:libcupti.so.13 -Wl,-rpath,'$ORIGIN' -lpthread
  xz -T0 -9 -c $cu/nvidia/cu13/lib/libcupti.so.13 > .gpu/x3/libcupti.so.13.xz
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  for c in ".gpu/p1 .gpu/x1" ".gpu/p2 .gpu/x2" ".gpu/p2 .gpu/x3" ".gpu/p2 .gpu/x4"; do
    echo "call carrying $c: $(( (tree + $(du -cb $c | tail -1 | cut -f1)) / 1048576 )) MiB of 64"
  done
  ;;
stash)
  bash .gpu/p1/stash.sh
  cp .gpu/x1/* $stash/
  ls -la $stash; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  ;;
run)
  shift
  start=$(date +%s)
  unpack
  if [ -f .gpu/x3/libcupti.so.13.xz ]; then
    mkdir -p /tmp/cupti && xz -dc .gpu/x3/libcupti.so.13.xz > /tmp/cupti/libcupti.so.13 && cp .gpu/x3/libcupti_trace.so /tmp/cupti/
  fi
  serve=()
  [ ! -f .gpu/x4/mlx-serving.xz ] || serve=(--serve /tmp/mlx-serving)
  mlx_cuda
  out=${OUT:-/tmp/gpu-bench-out}; mkdir -p "$out"
  ldd /tmp/mlx-serving-worker | grep -i "mlx\|not found" || true
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
  # Stop starting work ~80 s before the 600 s limit of one call (setup time included).
  budget=$(( ${GPU_BENCH_SECONDS:-520} - ($(date +%s) - start) ))
  echo "setup took $(( $(date +%s) - start )) s; bench budget $budget s"
  set -o pipefail
  PYTHONUNBUFFERED=1 timeout $(( budget + 70 )) python3 benches/gpu/bench.py --out "$out" \
    --binary /tmp/mlx-serving-worker "${serve[@]}" --budget-s "$budget" "$@" 2>&1 | tee "$out/log.txt" || echo "bench.py exited with $?"
  [ -f "$out/table.md" ] && cat "$out/table.md"
  ;;
py)
  # One Python script against MLX CUDA, e.g. the quantized-matmul microbenchmark:
  #   bash benches/gpu.sh py benches/gpu/qmm.py --out \$OUT/qmm.json
  shift
  mlx_cuda
  PYTHONUNBUFFERED=1 python3 "$@"
  ;;
sh)
  # Any command with MLX CUDA set up (the stashed binaries unpacked under /tmp), e.g.
  #   bash benches/gpu.sh sh /tmp/step_ops /tmp/models/qwen3-0.6b-q4 8 ragged time
  shift
  unpack
  mlx_cuda
  "$@"
  ;;
local)
  shift
  PY=${PY:-$root/.venv-bench/bin/python}
  "$PY" benches/gpu/bench.py --out "${OUT:-/tmp/gpu-bench-local}" --device cpu --serve target/release/mlx-serving --work /tmp/gpu-bench-local-models \
    --models qwen3-tiny-bf16 llama3-tiny-q4 --levels 1 4 --prompt 64 --decode 32 --prefill 256 --agg-tokens 16 \
    --runs 1 --rounds 1 --bw-gib 0.25 --kv-cache-bytes 1000000000 --parity-models qwen3-bf16 llama-q4g32 "$@"
  ;;
*)
  sed -n 2,15p "$0"; exit 2 ;;
esac
