#!/usr/bin/env bash
# Prepares a fresh checkout: a Python venv in .venv with the pinned MLX wheel, whose libmlx and
# headers the Rust build links against. Idempotent; prints the venv's python for MLX_PYTHON.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
stamp="$venv/.requirements"
if ! cmp -s "$root/requirements.txt" "$stamp"; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/requirements.txt" >&2
  cp "$root/requirements.txt" "$stamp"
fi
if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install the Rust toolchain (https://rustup.rs), 1.95 or newer" >&2
  exit 1
fi
echo "$venv/bin/python"
