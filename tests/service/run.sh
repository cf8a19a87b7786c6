#!/usr/bin/env bash
# Checks the service files:
#   1. config/systemd/mlx-serving.service: `systemd-analyze verify` accepts it without a single
#      warning (a copy whose ExecStart points at target/release/mlx-serving, which verify needs to
#      exist), and its settings (tests/service/check.py unit): Type=notify, KillMode=mixed, a stop
#      timeout above the default drain deadline plus the stop grace read from
#      config/mlx-serving.toml, no device allow-list that would hide GPUs.
#   2. config/launchd/com.mlx-serving.plist: `plutil -lint` where it exists (macOS), and on every
#      system its keys through python3's plistlib, ExitTimeOut above the same bound.
#   3. Linux: the release supervisor run as the unit runs it (its Environment=, a notification
#      socket, WATCHDOG_USEC), under strace, through requests, SIGHUP, kill -9 of a worker, a
#      rolling restart and SIGTERM: READY=1, WATCHDOG=1, STATUS= and STOPPING=1 arrive, it exits 0,
#      and no system call, memory mapping or socket family it or its workers used (MLX's g++
#      kernel compile included) is one the unit's SystemCallFilter, MemoryDenyWriteExecute or
#      RestrictAddressFamilies refuses.
# systemd-analyze does not check that User= exists; the unit's user is not created here.
# Linux needs target/release/mlx-serving and mlx-serving-worker, python3 (3.11+), and installs the
# systemd and strace packages with apt-get when they are missing. Exits non-zero on any failure.
# MLX_SERVICE_KEEP=1 keeps the temporary directory (unit copy, strace output, supervisor log).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
unit="$root/config/systemd/mlx-serving.service"
plist="$root/config/launchd/com.mlx-serving.plist"
config="$root/config/mlx-serving.toml"
check() { python3 "$root/tests/service/check.py" "$@"; }
t0=$(date +%s)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/mlx-service.XXXXXX")
cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -f "$tmp/supervisor.log" ]; then
    echo "--- tail of the supervisor's log"; tail -n 20 "$tmp/supervisor.log"
  fi
  if [ -n "${MLX_SERVICE_KEEP:-}" ]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
  exit "$rc"
}
trap cleanup EXIT

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "$@" >/dev/null ||
    { apt-get update >/dev/null && apt-get install -y --no-install-recommends "$@" >/dev/null; }
}

echo "== launchd: $plist"
if command -v plutil >/dev/null; then
  plutil -lint "$plist"
fi
check plist "$plist" "$config"

if [ "$(uname -s)" != Linux ]; then
  echo "== systemd: not on Linux, unit not checked"
  exit 0
fi

echo "== systemd: $unit"
bin="$root/target/release"
for b in mlx-serving mlx-serving-worker; do
  [ -x "$bin/$b" ] || { echo "missing $bin/$b: build first (cargo build --release -p mlx-serving -p mlx-serving-worker)" >&2; exit 1; }
done
command -v systemd-analyze >/dev/null || apt_install systemd
command -v strace >/dev/null || apt_install strace
check unit "$unit" "$config"

# verify loads the unit and checks that its commands exist: run it on a copy whose ExecStart
# names the built binary. It exits 0 on unknown keys and values it cannot parse, and only prints
# them, so any output is a failure.
mkdir "$tmp/unit"
sed "s#^ExecStart=/usr/local/bin/mlx-serving #ExecStart=$bin/mlx-serving #" "$unit" > "$tmp/unit/mlx-serving.service"
grep -q "^ExecStart=$bin/mlx-serving serve " "$tmp/unit/mlx-serving.service" || { echo "FAIL: ExecStart not rewritten" >&2; exit 1; }
# That verify reports problems at all on this system: a copy with an unknown key must be flagged.
sed 's/^NoNewPrivileges=/NoNewPrivilegez=/' "$tmp/unit/mlx-serving.service" > "$tmp/unit/flawed.service"
if [ -z "$(cd "$tmp/unit" && systemd-analyze verify ./flawed.service 2>&1)" ]; then
  echo "FAIL: systemd-analyze verify printed nothing for a unit with an unknown key" >&2; exit 1
fi
if ! out=$(cd "$tmp/unit" && systemd-analyze verify ./mlx-serving.service 2>&1) || [ -n "$out" ]; then
  echo "FAIL: systemd-analyze verify:"; echo "$out"; exit 1
fi
echo "  ok: systemd-analyze verify: no warnings ($(systemd-analyze --version | head -n 1))"
echo "  exposure: $(cd "$tmp/unit" && systemd-analyze security --offline=yes ./mlx-serving.service 2>/dev/null | tail -n 1 | sed 's/^→ //')"

echo "== the supervisor as the unit runs it"
check trace "$unit" "$bin/mlx-serving" "$config" "$tmp"

echo "== service checks passed in $(( $(date +%s) - t0 )) s"
