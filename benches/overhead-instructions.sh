#!/usr/bin/env bash
# Instructions the supervisor executes per request and per streamed token, counted by
# valgrind's callgrind (deterministic, unlike times on a shared machine). Starts
# `mlx-serving serve` (SERVE, default target/release/mlx-serving) under callgrind with one real
# worker on the bundled model, sends 20 streamed chat requests of 1 token and 20 of 33 tokens
# (curl, a new connection each), and prints the counts of each batch.
# Needs valgrind and curl; docs/benchmarks-overhead.md has the method.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
serve=${SERVE:-$root/target/release/mlx-serving}
port=${PORT:-18090}
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
cat > "$dir/config.toml" <<TOML
[pool]
workers = 1
worker_command = ["$root/target/release/mlx-serving-worker"]

[http]
listen = "127.0.0.1:$port"

[admin]
listen = "127.0.0.1:$((port + 1))"

[logging]
level = "warn"

[[models]]
name = "m"
path = "$root/tests/fixtures/models/qwen3-bf16"
preload = true
keep_alive_s = 0
TOML
valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" "$serve" serve --config "$dir/config.toml" > "$dir/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 240); do
  curl -s -o /dev/null -w '%{http_code}' "localhost:$port/ready" 2>/dev/null | grep -q 200 && break
  sleep 0.5
done
req() {
  curl -s -N "localhost:$port/v1/chat/completions" -H 'content-type: application/json' \
    -d "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hello $1 there\"}],\"max_tokens\":$2,\"temperature\":0,\"ignore_eos\":true,\"stream\":true,\"return_token_ids\":true}" > /dev/null
}
for i in 1 2 3; do req "warm$i" 8; done
callgrind_control -z "$pid" > /dev/null 2>&1; for i in $(seq 1 20); do req "one$i" 1; done; callgrind_control -d one "$pid" > /dev/null 2>&1
callgrind_control -z "$pid" > /dev/null 2>&1; for i in $(seq 1 20); do req "many$i" 33; done; callgrind_control -d many "$pid" > /dev/null 2>&1
one=$(awk '/^summary/ {print $2}' "$dir"/cg.out.*1)
many=$(awk '/^summary/ {print $2}' "$dir"/cg.out.*2)
echo "$(basename "$serve"): $((one / 20)) instructions per 1-token request; $(((many - one) / 20 / 32)) per further streamed token"
