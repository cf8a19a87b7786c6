#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: sets up MLX, builds, tests.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MLX_PYTHON=$(bash "$root/scripts/setup.sh")
export MLX_PYTHON
cd "$root"
cargo test --workspace --release --locked 2>&1
