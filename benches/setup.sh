#!/usr/bin/env bash
# Shared by the benchmark scripts: MLX for the build (.venv), mlx-lm for the peer (.venv-bench),
# then a release build of the given packages. Prints the bench venv's python.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MLX_PYTHON=$(bash "$root/scripts/setup.sh")
export MLX_PYTHON
venv="$root/.venv-bench"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/tests/fixtures/requirements.txt" >&2
fi
cd "$root"
for p in "$@"; do
  cargo build --release --locked --quiet -p "$p" >&2
done
echo "$venv/bin/python"
