"""Supervisor figures with real workers: crash detection latency, replacement-ready time, and
the supervisor's RSS with idle workers.

Starts `mlx-serving serve` with 4 workers on the bundled model, then kills one worker with
SIGKILL at a time (round robin), and for each kill reads from the admin API:
- detection: the crash record's timestamp minus the moment of the kill;
- replacement ready: from the kill until the slot reports `ready` again (polled every 2 ms).
Between kills a slot stays healthy for the restart window, so each kill is a first crash after
a healthy run (backoff at its minimum), as in production.

    python benches/supervisor.py --kills 100
"""
import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def admin(port, method, params=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", "/", json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}),
              {"Content-Type": "application/json"})
    body = json.loads(c.getresponse().read())
    c.close()
    return body["result"]


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--model", default=str(ROOT / "tests/fixtures/models/qwen3-bf16"))
    ap.add_argument("--binary", default=str(ROOT / "target/release/mlx-serving"))
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    window_ms = 1000
    config = f"""
[pool]
workers = {a.workers}
[admin]
listen = "127.0.0.1:{port}"
[restart]
window_ms = {window_ms}
max_spawns = 5
[[models]]
name = "m"
path = "{a.model}"
preload = true
"""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(config)
    sup = subprocess.Popen([a.binary, "serve", "--config", f.name], env={**os.environ, "RUST_LOG": "warn"})
    try:
        for _ in range(600):
            try:
                if admin(port, "status")["ready_workers"] == a.workers:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            sys.exit("workers did not become ready")
        time.sleep(1)
        print(f"supervisor RSS with {a.workers} idle workers: {rss_kb(sup.pid) / 1024:.1f} MiB")
        detect, ready = [], []
        for k in range(a.kills):
            slot = k % a.workers
            w = next(w for w in admin(port, "status")["workers"] if w["id"] == slot)
            crashes_before = w["crashes"]
            t_kill = time.time()
            os.kill(w["pid"], signal.SIGKILL)
            seen_crash = None
            while True:
                w = next(w for w in admin(port, "status")["workers"] if w["id"] == slot)
                if seen_crash is None and (w["crashes"] > crashes_before or (w["last_crash"] and w["last_crash"]["at_unix_s"] > t_kill)):
                    seen_crash = w["last_crash"]["at_unix_s"]
                if seen_crash is not None and w["state"] == "ready" and w["pid"] != 0:
                    t_ready = time.time()
                    break
                if time.time() - t_kill > 30:
                    sys.exit(f"slot {slot} did not come back: {w}")
                time.sleep(0.002)
            detect.append((seen_crash - t_kill) * 1000)
            ready.append((t_ready - t_kill) * 1000)
            # Keep each slot healthy for the restart window before its next kill.
            time.sleep(max(0.0, window_ms / 1000 / a.workers + 0.05))
        print(f"kills: {len(detect)}")
        print(f"crash detection (kill to supervisor event): p50 {statistics.median(detect):.2f} ms, "
              f"p99 {pct(detect, 99):.2f} ms, max {max(detect):.2f} ms")
        print(f"replacement ready (kill to ready, model loaded): p50 {statistics.median(ready):.1f} ms, "
              f"p99 {pct(ready, 99):.1f} ms (includes the 100 ms restart delay)")
        print(f"supervisor RSS after the kills: {rss_kb(sup.pid) / 1024:.1f} MiB")
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=30)
        os.unlink(f.name)


if __name__ == "__main__":
    main()
