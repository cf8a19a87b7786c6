#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: sets up MLX, builds, runs the Rust tests, then
# the HTTP API tests with the real `openai` package against the real server.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MLX_PYTHON=$(bash "$root/scripts/setup.sh")
export MLX_PYTHON
cd "$root"
# The binaries first: the supervisor's tests start the worker and the fault-injecting proxy.
cargo build --workspace --release --locked --bins 2>&1
cargo test --workspace --release --locked 2>&1
stamp="$root/.venv/.api-requirements"
if ! cmp -s "$root/tests/api/requirements.txt" "$stamp"; then
  "$root/.venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/tests/api/requirements.txt"
  cp "$root/tests/api/requirements.txt" "$stamp"
fi
"$root/.venv/bin/python" -m pytest "$root/tests/api" -q -p no:cacheprovider 2>&1
# The protocol conformance suite against the Rust and the Python worker, and the Python worker's
# own tests.
bash "$root/tests/conformance/run.sh" 2>&1
# The systemd unit and the launchd plist (systemd-analyze, strace from Debian's packages).
bash "$root/tests/service/run.sh" 2>&1
# Two supervisors behind HAProxy (installed from Debian's packages when missing).
bash "$root/tests/scaling/run.sh" 2>&1
bash "$root/chaos/run.sh" 2>&1
