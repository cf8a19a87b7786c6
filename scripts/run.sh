#!/usr/bin/env bash
# Runs mlx-serving on a fresh machine: sets up MLX, builds, and passes the arguments on.
# With no arguments it serves the bundled demo model (config/mlx-serving.toml): the
# OpenAI-compatible API on 127.0.0.1:8080, the admin API on 127.0.0.1:8081.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MLX_PYTHON=$(bash "$root/scripts/setup.sh")
export MLX_PYTHON
cd "$root"
cargo build --release --locked --quiet -p mlx-serving -p mlx-serving-worker
if [ $# -eq 0 ]; then
  set -- serve --config "$root/config/mlx-serving.toml"
fi
exec "$root/target/release/mlx-serving" "$@"
