#!/usr/bin/env bash
# mlx-serving against mlx_lm.server through HTTP, side by side (benches/compare.py). Extra
# arguments go to compare.py; the default model is the bundled qwen3-bf16.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$(bash "$root/benches/setup.sh" mlx-serving mlx-serving-worker mlx-serving-bench)
exec "$python" "$root/benches/compare.py" --python "$python" "$@"
