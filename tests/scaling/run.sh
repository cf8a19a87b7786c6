#!/usr/bin/env bash
# Two supervisors on loopback behind HAProxy running config/haproxy/mlx-serving.cfg unchanged
# (its addresses come from environment variables). Shows, through the balancer:
#   1. traffic (completions and chat, plain and streaming) is complete and reaches both hosts;
#   2. kill -9 of one supervisor: HAProxy marks it down, requests in the window before that are
#      retried on the other host (only streams the dead host had started can fail), and every
#      request after the mark-down succeeds;
#   3. the killed supervisor restarted: HAProxy marks it up and traffic reaches both again;
#   4. SIGTERM of one supervisor: /ready turns 503 at once, its running stream finishes, and
#      requests keep succeeding while it drains and after it exits.
# Needs target/release/mlx-serving and mlx-serving-worker, python3 and curl; installs haproxy
# with apt-get when missing. Prints a summary; exits non-zero on any failure.
# MLX_SCALING_KEEP=1 keeps the temporary directory (configurations, logs, reports).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin="$root/target/release"
lb() { python3 "$root/tests/scaling/lb.py" "$@"; }
say() { printf '[%5.1fs] %s\n' "$(( $(date +%s%N) / 1000000 - t_start ))e-3" "$*"; }
fail() { say "FAIL: $*"; exit 1; }
t_start=$(( $(date +%s%N) / 1000000 ))

for b in mlx-serving mlx-serving-worker; do
  [ -x "$bin/$b" ] || { echo "missing $bin/$b: build first (cargo build --release -p mlx-serving -p mlx-serving-worker)" >&2; exit 1; }
done
command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 1; }
command -v curl >/dev/null || { echo "curl is required" >&2; exit 1; }
if ! command -v haproxy >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends haproxy >/dev/null ||
    { apt-get update >/dev/null && apt-get install -y --no-install-recommends haproxy >/dev/null; }
fi
command -v haproxy >/dev/null || { echo "haproxy could not be installed" >&2; exit 1; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/mlx-scaling.XXXXXX")
pids=()
cleanup() {
  local rc=$?
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "$rc" -ne 0 ]; then
    for f in "$tmp"/*.log; do [ -f "$f" ] && { echo "--- tail of $(basename "$f")"; tail -n 15 "$f"; }; done
  fi
  if [ -n "${MLX_SCALING_KEEP:-}" ]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Free loopback ports: the OpenAI and admin APIs of hosts a and b, the frontend, HAProxy's stats.
read -r http_a admin_a http_b admin_b front stats < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')

# The shipped configuration as the supervisor reads it (`config check` prints it with paths made
# absolute); addresses and the worker count are set on the command line.
"$bin/mlx-serving" config check "$root/config/mlx-serving.toml" > "$tmp/mlx-serving.toml" 2>/dev/null ||
  fail "config/mlx-serving.toml does not pass \`mlx-serving config check\`"
grep -q '^name = "tiny"' "$tmp/mlx-serving.toml" || fail "the configuration has no model \`tiny\`"

declare -A sup_pid
start_supervisor() { # name http admin
  "$bin/mlx-serving" serve --config "$tmp/mlx-serving.toml" --workers 1 \
    --listen "127.0.0.1:$2" --admin-listen "127.0.0.1:$3" >> "$tmp/supervisor-$1.log" 2>&1 &
  sup_pid[$1]=$!
  pids+=("$!")
}
wait_ready() { # name http
  for _ in $(seq 1 300); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$2/ready")" = 200 ] && return 0
    kill -0 "${sup_pid[$1]}" 2>/dev/null || fail "supervisor $1 exited at start"
    sleep 0.1
  done
  fail "supervisor $1 not ready after 30 s"
}
worker_pids() { # admin
  "$bin/mlx-serving" admin --addr "127.0.0.1:$1" --json status |
    python3 -c 'import json,sys; print(*(w["pid"] for w in json.load(sys.stdin)["workers"] if w["pid"]))'
}

start_supervisor a "$http_a" "$admin_a"
start_supervisor b "$http_b" "$admin_b"
wait_ready a "$http_a"
wait_ready b "$http_b"
say "supervisors a (:$http_a) and b (:$http_b) ready, 1 worker each"

export MLX_SERVING_BIND="127.0.0.1:$front" MLX_SERVING_HOST1="127.0.0.1:$http_a" \
  MLX_SERVING_HOST2="127.0.0.1:$http_b" MLX_HAPROXY_STATS="127.0.0.1:$stats" MLX_HAPROXY_SOCKET="$tmp/haproxy.sock" \
  MLX_HAPROXY_USER="$(id -un)" MLX_HAPROXY_GROUP="$(id -gn)"
cfg="$root/config/haproxy/mlx-serving.cfg"
haproxy -c -q -f "$cfg" || fail "haproxy rejects $cfg"
haproxy -db -f "$cfg" > "$tmp/haproxy.log" 2>&1 &
pids+=("$!")
front_url="http://127.0.0.1:$front"
for _ in $(seq 1 100); do [ -S "$tmp/haproxy.sock" ] && break; sleep 0.1; done
lb wait --socket "$tmp/haproxy.sock" --server host1 --status UP --timeout 20 >/dev/null || fail "host1 not up"
lb wait --socket "$tmp/haproxy.sock" --server host2 --status UP --timeout 20 >/dev/null || fail "host2 not up"
say "haproxy on :$front sees host1 (a) and host2 (b) UP"

# The public frontend refuses /metrics; HAProxy's own metrics are on the stats port.
[ "$(curl -s -o /dev/null -w '%{http_code}' "$front_url/metrics")" = 404 ] || fail "/metrics is not refused on the frontend"
curl -sf -o "$tmp/haproxy-metrics.txt" "http://127.0.0.1:$stats/metrics" || fail "no /metrics on haproxy's stats port"
grep -q '^haproxy_server_status' "$tmp/haproxy-metrics.txt" || fail "no server status in haproxy's metrics"

# 1. Traffic reaches both hosts, every answer complete.
out=$(lb traffic --url "$front_url" --count 32 --clients 4) || fail "traffic through the balancer: $out"
served_a=$(lb served --url "http://127.0.0.1:$http_a")
served_b=$(lb served --url "http://127.0.0.1:$http_b")
say "traffic: $out; host a served $served_a, host b served $served_b"
[ "$served_a" -gt 0 ] && [ "$served_b" -gt 0 ] || fail "one host served nothing"
[ $((served_a + served_b)) -eq 32 ] || fail "hosts served $((served_a + served_b)) of 32 requests"

# 2. kill -9 host b under load.
workers_b=$(worker_pids "$admin_b") || fail "admin status of supervisor b failed"
[ -n "$workers_b" ] || fail "supervisor b reports no worker pid"
say "kill -9 supervisor b (pid ${sup_pid[b]}) under load from 4 clients"
# (The braces keep bash's own "Killed" notice for the supervisor out of the output.)
{ lb kill --url "$front_url" --socket "$tmp/haproxy.sock" --server host2 --pid "${sup_pid[b]}" \
    --report "$tmp/kill.json" > "$tmp/kill.out" 2>&1; } 2>/dev/null ||
  { cat "$tmp/kill.out"; fail "requests failed around the kill"; }
wait "${sup_pid[b]}" 2>/dev/null || true
kill_summary=$(lb summary kill "$tmp/kill.json")
say "kill: $kill_summary"
sleep 0.5
for w in $workers_b; do
  if kill -0 "$w" 2>/dev/null && [ "$(ps -o stat= -p "$w" | cut -c1)" != Z ]; then
    fail "worker $w of the killed supervisor is still running"
  fi
done

# 3. Restart host b: HAProxy marks it up, traffic reaches both hosts again.
t_restart=$(date +%s%N)
start_supervisor b "$http_b" "$admin_b"
wait_ready b "$http_b"
lb wait --socket "$tmp/haproxy.sock" --server host2 --status UP --timeout 30 >/dev/null || fail "host2 not up after the restart"
up_s=$(python3 -c "print(round(($(date +%s%N) - $t_restart) / 1e9, 1))")
before_a=$(lb served --url "http://127.0.0.1:$http_a")
out=$(lb traffic --url "$front_url" --count 24 --clients 4) || fail "traffic after the restart: $out"
again_a=$(( $(lb served --url "http://127.0.0.1:$http_a") - before_a ))
again_b=$(lb served --url "http://127.0.0.1:$http_b")
say "restart: host2 UP in haproxy ${up_s} s after the restart; $out; host a served $again_a, host b served $again_b"
[ "$again_a" -gt 0 ] && [ "$again_b" -gt 0 ] || fail "traffic did not return to both hosts"

# 4. SIGTERM host b: drain.
say "SIGTERM supervisor b with a long stream on it, under load"
lb drain --url "$front_url" --direct "http://127.0.0.1:$http_b" --socket "$tmp/haproxy.sock" --server host2 \
  --pid "${sup_pid[b]}" --report "$tmp/drain.json" > "$tmp/drain.out" || { cat "$tmp/drain.out"; fail "drain"; }
rc=0; wait "${sup_pid[b]}" || rc=$?
[ "$rc" -eq 0 ] || fail "supervisor b exited $rc after SIGTERM"
drain_summary=$(lb summary drain "$tmp/drain.json")
say "drain: $drain_summary"

echo
echo "scaling test passed in $(python3 -c "print(round(($(date +%s%N) / 1000000 - $t_start) / 1000))") s"
echo "  traffic through haproxy reached both hosts; answers complete"
echo "  kill -9: $kill_summary"
echo "  restart: back in rotation after ${up_s} s"
echo "  SIGTERM: $drain_summary"
