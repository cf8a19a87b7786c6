#!/usr/bin/env bash
# Supervisor overhead against a worker called directly (benches/overhead, method in
# docs/benchmarks-overhead.md). Builds the release binaries and the worker tap, then runs
# mlx-serving-overhead; extra arguments go to it (--rounds, --tokens, --model, --json, ...).
# The default model is the bundled qwen3-bf16; results go to target/overhead/overhead.json.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MLX_PYTHON=${MLX_PYTHON:-$(bash "$root/scripts/setup.sh")}
export MLX_PYTHON
cd "$root"
cargo build --release --locked --quiet -p mlx-serving -p mlx-serving-worker -p mlx-serving-overhead
out="$root/target/overhead"
mkdir -p "$out"
cc -O2 -Wall -shared -fPIC -o "$out/tap.so" benches/overhead/tap.c -ldl -lpthread
exec target/release/mlx-serving-overhead \
  --worker target/release/mlx-serving-worker --serve target/release/mlx-serving --tap "$out/tap.so" \
  --model tests/fixtures/models/qwen3-bf16 --json "$out/overhead.json" "$@"
