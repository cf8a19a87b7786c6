#!/usr/bin/env bash
# Runs every chaos scenario against a real server and prints each JSON summary; exits non-zero
# if any scenario fails. Short by default (for CI); CHAOS_DURATION and CHAOS_SOAK_DURATION set
# the seconds of faults (docs/chaos.md has the long runs).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MLX_PYTHON=$(bash "$root/scripts/setup.sh")
export MLX_PYTHON
cd "$root"
cargo build --release --locked --quiet -p mlx-serving -p mlx-serving-worker -p mlx-serving-faultworker -p mlx-serving-chaos
duration=${CHAOS_DURATION:-12}
soak=${CHAOS_SOAK_DURATION:-40}
failed=()
for scenario in kill9 hang rolling garbage oom crashloop supervisor-kill soak; do
  d=$duration
  [ "$scenario" = soak ] && d=$soak
  echo "== chaos $scenario (${d} s)"
  if ! "$root/target/release/mlx-serving-chaos" "$scenario" --duration "$d"; then
    failed+=("$scenario")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "chaos: FAILED: ${failed[*]}"
  exit 1
fi
echo "chaos: all scenarios passed"
