#!/usr/bin/env bash
# One worker's throughput against mlx_lm.server (benches/worker.py). Extra arguments go to
# worker.py; the default model is the bundled qwen3-bf16.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$(bash "$root/benches/setup.sh" mlx-serving-worker)
[ $# -eq 0 ] && set -- --model "$root/tests/fixtures/models/qwen3-bf16"
exec "$python" "$root/benches/worker.py" --python "$python" "$@"
