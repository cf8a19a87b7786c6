#!/usr/bin/env bash
# Installs the Python worker (python-compat) into a venv of its own, runs its tests, then the
# protocol conformance suite against the Rust worker and the Python worker. Run after
# scripts/setup.sh and a release build of the Rust binaries. Idempotent: the venv is rebuilt
# only when python-compat's requirements or pyproject.toml change.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
pkg="$root/python-compat"
venv="$pkg/.venv"
rust_worker="${RUST_WORKER:-$root/target/release/mlx-serving-worker}"

if [ ! -x "$rust_worker" ]; then
  echo "missing $rust_worker: build it first (cargo build --release --bins)" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
stamp="$venv/.installed"
if ! cat "$pkg/requirements.txt" "$pkg/pyproject.toml" | cmp -s - "$stamp"; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$pkg/requirements.txt"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -e "$pkg"
  cat "$pkg/requirements.txt" "$pkg/pyproject.toml" > "$stamp"
fi

py="$venv/bin/python"
cd "$root"
echo "== python-compat tests"
"$py" -m pytest "$pkg/tests" -q -p no:cacheprovider 2>&1
echo "== conformance: Rust worker ($rust_worker)"
WORKER_CMD="[\"$rust_worker\"]" "$py" -m pytest "$root/tests/conformance" -q -p no:cacheprovider 2>&1
echo "== conformance: Python worker"
WORKER_CMD="[\"$venv/bin/mlx-serving-pyworker\"]" "$py" -m pytest "$root/tests/conformance" -q -p no:cacheprovider 2>&1
echo "== mixed pool: 2 Rust workers and 1 Python worker behind one supervisor"
MLX_SERVING_BIN="$root/target/release/mlx-serving" PYWORKER="$venv/bin/mlx-serving-pyworker" \
  "$py" -m pytest "$root/tests/mixed" -q -p no:cacheprovider 2>&1
