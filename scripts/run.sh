#!/usr/bin/env bash
# Runs mlx-serving on a fresh machine: sets up MLX, builds, and passes the arguments on.
# With no arguments it generates from the bundled tiny model.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MLX_PYTHON=$(bash "$root/scripts/setup.sh")
export MLX_PYTHON
cd "$root"
cargo build --release --locked --quiet -p mlx-serving
if [ $# -eq 0 ]; then
  set -- generate --model "$root/tests/fixtures/models/qwen3-bf16" --chat --prompt "Tell me about the license." --max-tokens 64
fi
exec "$root/target/release/mlx-serving" "$@"
