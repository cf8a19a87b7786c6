"""A 4-bit model through `mlx-serving serve` on a GPU whose kernel cache is empty, with the pool's
default timeouts: does the pool keep serving while MLX CUDA compiles kernels?

MLX CUDA compiles the kernels of a quantized product of several rows at run time the first time a
tile size is needed (about 35 s each on an H200) and keeps them under MLX_PTX_CACHE_DIR. Each
variant here gets an empty cache directory, then: the time until the worker is ready, rounds of
concurrent streams, and the supervisor's worker restarts (`mlx_worker_restarts_total`). Variants are
the worker's `--warm-up` values. Run on the GPU machine with the supervisor unpacked:
  bash benches/gpu.sh sh python3 benches/gpu/coldstart.py --model /tmp/m/qwen3-0.6b-q4 --out $OUT/coldstart.json
"""
import argparse
import json
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def stream(port, prompt, max_tokens, timeout):
    """One streamed completion: (whether it finished, error or None)."""
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "stream": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    done, err = False, None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for line in r:
                line = line.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                msg = json.loads(line[5:])
                if msg.get("error"):
                    err = json.dumps(msg["error"])[:300]
                elif msg.get("choices") and msg["choices"][0].get("finish_reason"):
                    done = True
    except Exception as e:  # noqa: BLE001 - the error is the measurement
        err = f"{type(e).__name__}: {e}"[:300]
    return done, err


def restarts(port):
    text = get(f"http://127.0.0.1:{port}/metrics")
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'mlx_worker_restarts_total\{reason="([^"]+)"\} (\S+)', text)
            if float(m.group(2)) > 0}


def variant(a, warm_up):
    tmp = Path(tempfile.mkdtemp(prefix=f"coldstart-{warm_up}-"))
    port, admin = free_port(), free_port()
    cmd = [a.worker, "--warm-up", warm_up, "--max-sequences", str(max(a.levels)), "--kv-cache-bytes", str(8 << 30)]
    cfg = tmp / "serve.toml"
    # The pool's own timeouts: start, heartbeat and stall are not set here.
    cfg.write_text(f"""[pool]
workers = 1
worker_command = {json.dumps(cmd)}
device = "{a.device}"
max_in_flight_per_worker = {max(a.levels)}
[http]
listen = "127.0.0.1:{port}"
[admin]
listen = "127.0.0.1:{admin}"
[logging]
level = "info"
[[models]]
name = "m"
path = "{a.model}"
preload = true
""")
    env = dict(os.environ, MLX_PTX_CACHE_DIR=str(tmp / "ptx"))
    log = open(tmp / "serve.log", "wb")
    p = subprocess.Popen([a.serve, "serve", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env)
    rec = {"warm_up": warm_up, "rounds": []}
    t0 = time.time()
    try:
        ready = None
        while time.time() - t0 < a.ready_limit_s and p.poll() is None:
            try:
                if json.loads(get(f"http://127.0.0.1:{port}/ready")).get("ready_workers", 0) >= 1:
                    ready = time.time() - t0
                    break
            except OSError:
                pass
            time.sleep(0.5)
        rec["ready_s"] = ready
        print(f"--warm-up {warm_up}: ready after {ready} s", flush=True)
        for lv in a.levels:
            if ready is None:
                break
            t = time.time()
            res = [None] * lv

            def one(i):
                res[i] = stream(port, f"Request {i} of a round of {lv}: tell a story about the sea.", a.tokens,
                                a.round_limit_s)

            ths = [threading.Thread(target=one, args=(i,)) for i in range(lv)]
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            r = {"streams": lv, "seconds": round(time.time() - t, 2), "finished": sum(bool(d) and not e for d, e in res),
                 "errors": sorted({e for _, e in res if e})[:5],
                 "restarts": restarts(port)}
            rec["rounds"].append(r)
            print(f"  {lv} streams: {r}", flush=True)
        rec["restarts"] = restarts(port) if p.poll() is None else None
    finally:
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
        log.close()
        lines = (tmp / "serve.log").read_text(errors="replace").splitlines()
        rec["log"] = [x for x in lines if re.search(r"warm|hung|restart|ready|error|WARN|ERROR", x)][-40:]
        rec["ptx_cache"] = sorted(f.name for f in (tmp / "ptx").glob("*.ptx"))
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", default="/tmp/mlx-serving")
    ap.add_argument("--worker", default="/tmp/mlx-serving-worker")
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="gpu")
    ap.add_argument("--variants", nargs="+", default=["never", "auto"], help="--warm-up values, one server each")
    ap.add_argument("--levels", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--ready-limit-s", type=float, default=200)
    ap.add_argument("--round-limit-s", type=float, default=90)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = {"variants": []}
    for v in a.variants:
        out["variants"].append(variant(a, v))
        Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
