#!/usr/bin/env bash
# Decode speed against mlx_lm generate: sets up a venv with mlx-lm (.venv-bench), builds, runs
# benches/decode.py. Extra arguments go to decode.py (default model: the bundled qwen3-bf16).
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
cargo build --release --locked --quiet -p mlx-serving
if [ $# -eq 0 ]; then
  set -- --model "$root/tests/fixtures/models/qwen3-bf16"
fi
exec "$venv/bin/python" "$root/benches/decode.py" --python "$venv/bin/python" "$@"
