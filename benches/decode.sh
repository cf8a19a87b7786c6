#!/usr/bin/env bash
# Decode speed against mlx_lm generate (benches/decode.py). Extra arguments go to decode.py;
# the default model is the bundled qwen3-bf16.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$(bash "$root/benches/setup.sh" mlx-serving)
[ $# -eq 0 ] && set -- --model "$root/tests/fixtures/models/qwen3-bf16"
exec "$python" "$root/benches/decode.py" --python "$python" "$@"
