#!/usr/bin/env bash
# Device timelines of the engine's decode steps: step_ops (crates/engine/examples/step_ops.rs) runs
# 256 pipelined steps at a number of rows with cupti_trace.cpp recording them, and timeline.py sums
# the GPU's kernels, gaps and the driver's calls per step. On the GPU machine, after
# `benches/gpu.sh stash`, in a call carrying .gpu/p2, .gpu/x2 and .gpu/x3 (models from bench_models.py):
#
#   bash benches/gpu.sh sh bash benches/gpu/steptrace.sh $OUT/steptrace /tmp/m/qwen3-0.6b-q4:32:ragged ...
#
# Each argument is MODEL_DIR:ROWS[:WORD...] (step_ops' words: ragged, separate, nokernel).
set -euo pipefail
out=$1; shift
mkdir -p "$out" /tmp/cupti
[ -f /tmp/cupti/libcupti_trace.so ] || { xz -dc .gpu/x3/libcupti.so.13.xz > /tmp/cupti/libcupti.so.13; cp .gpu/x3/libcupti_trace.so /tmp/cupti/; }
[ -x /tmp/step_ops ] || { xz -dc .gpu/x2/step_ops.xz > /tmp/step_ops; chmod +x /tmp/step_ops; }
for spec in "$@"; do
  IFS=: read -r model rows words <<< "$spec"
  name=$(basename "$model")-$rows${words:+-${words//:/-}}
  # Untraced first: the kernels MLX compiles on first use, and the timing without CUPTI.
  /tmp/step_ops "$model" "$rows" ${words//:/ } time > "$out/$name.txt" 2>&1 || echo "step_ops failed: $name" >&2
  rm -f "/tmp/$name.on"
  LD_PRELOAD=/tmp/cupti/libcupti_trace.so CUPTI_TRACE_OUT="/tmp/$name.csv" CUPTI_TRACE_SWITCH="/tmp/$name.on" \
    /tmp/step_ops "$model" "$rows" ${words//:/ } time > "$out/$name-traced.txt" 2>&1 || echo "traced step_ops failed: $name" >&2
  python3 benches/gpu/timeline.py "/tmp/$name.csv" 256 > "$out/$name-timeline.json" || echo "timeline failed: $name" >&2
  echo "== $name"; grep timed "$out/$name.txt" "$out/$name-traced.txt" || true
  python3 - "$out/$name-timeline.json" <<'P' || true
import json, sys
r = json.load(open(sys.argv[1]))
print({k: r[k] for k in ("gpu_span_us", "gpu_busy_us", "gpu_idle_us", "gpu_idle_in_gaps_of_20us_or_more_us", "kernels", "kernel_us", "copies", "copy_bytes", "memsets")})
for k in r["top_kernels"][:14]:
    print(f"  {k['us_per_step']:>8} us {k['per_step']:>6}x {k['mean_us']:>7} us  {k['name'][:100]}")
for d in r["driver_calls"][:6]:
    print(f"  host {d['host_us_per_step']:>8} us {d['per_step']:>6}x  {d['name']}")
P
done
