#!/usr/bin/env bash
# Worker throughput against mlx_lm.server: sets up a venv with mlx-lm (.venv-bench), builds, runs
# benches/worker.py. Extra arguments go to worker.py (default model: the bundled qwen3-bf16).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MLX_PYTHON=$(bash "$root/scripts/setup.sh")
export MLX_PYTHON
venv="$root/.venv-bench"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/tests/fixtures/requirements.txt"
fi
cd "$root"
cargo build --release --locked --quiet -p mlx-serving-worker
if [ $# -eq 0 ]; then
  set -- --model "$root/tests/fixtures/models/qwen3-bf16"
fi
exec "$venv/bin/python" "$root/benches/worker.py" --python "$venv/bin/python" "$@"
