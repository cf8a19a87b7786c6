#!/usr/bin/env python3
"""mlx-serving-worker against mlx-lm on one GPU (MLX CUDA), side by side; driven by benches/gpu.sh.

Steps, each written to OUT/results.json as soon as it is done (a run cut short keeps what it did):
  1. device copy bandwidth (a big bf16 array through an elementwise copy, bytes read + written);
  2. greedy parity: the first 32 greedy tokens of our worker on this device, and of mlx-lm on this
     device, for every fixture model in tests/fixtures/models, against tests/fixtures/golden/*.json
     (mlx-lm on the CPU, which our CPU build equals token for token);
  3. per benchmark model (random weights, benches/gpu/bench_models.py), made here, then:
     - batch-1: decode tokens/s (a PROMPT-token prompt, DECODE greedy tokens, ignore_eos) and prefill
       tokens/s (a PREFILL-token prompt, 1 token) of our worker over its stdio protocol and of
       mlx_lm.generate.generate_step in process;
     - aggregate tokens/s and client-side TTFT p50/p95 at each level of concurrent streams: our worker
       over stdio against mlx_lm.server (BatchGenerator) over HTTP with SSE; each level starts with
       an unmeasured round of 8-token completions, then ROUNDS measured rounds (one at 128 and up);
     - each decode figure as a share of the bandwidth roofline: (weight bytes read per step + KV bytes
       read per step) / measured copy bandwidth.
A time budget skips what would not fit, and says so in the results.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402

T0 = time.time()
R: dict = {"started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "skipped": []}
OUT = Path(".")
HARD = T0 + 3600.0  # set in main: past it nothing waits on a server any longer


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def save():
    (OUT / "results.json").write_text(json.dumps(R, indent=1))


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ---------------------------------------------------------------- environment, bandwidth

def environment(device):
    env = {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "device": str(mx.default_device())}
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:  # noqa: BLE001
        env["nvidia_smi"] = f"unavailable: {e}"
    env["requested_device"] = device
    return env


def host_probe():
    """How fast this host runs a fixed piece of single-threaded Python, and its load: the GPU
    machines differ from call to call, and a batch-1 decode step is bound by the host."""
    best = None
    for _ in range(5):
        t = time.perf_counter()
        x = 0
        for i in range(200_000):
            x += i * i % 7
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return {"loop_ms": round(best * 1000, 2), "loadavg": os.getloadavg(), "cpus": os.cpu_count()}


def copy_bandwidth(gib=4.0, reps=20):
    n = int(gib * 2**30) // 2 // 4096 * 4096
    a = mx.random.uniform(shape=(n // 4096, 4096)).astype(mx.bfloat16)
    mx.eval(a)
    times = []
    for i in range(reps + 3):
        mx.synchronize()
        t = time.perf_counter()
        b = a * 1  # reads n*2 bytes, writes n*2 bytes
        mx.eval(b)
        mx.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
        del b
    del a
    mx.clear_cache()
    med = statistics.median(times)
    return {"array_bytes": n * 2, "median_s": med, "bytes_per_s": 2 * n * 2 / med,
            "best_bytes_per_s": 2 * n * 2 / min(times)}


# ---------------------------------------------------------------- our worker over stdio

class Worker:
    """mlx-serving-worker over its pipes; a reader thread timestamps every line as it arrives."""

    def __init__(self, binary, device, max_sequences, kv_bytes, extra=(), env=None):
        self.p = subprocess.Popen(
            [binary, "--device", device, "--max-sequences", str(max_sequences),
             "--kv-cache-bytes", str(kv_bytes), "--heartbeat-ms", "60000", *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=1 << 20,
            # The engine thread's step timing: a line every 256 steps and when it goes idle.
            env={**os.environ, **(env or {}), "RUST_LOG": "info,mlx_serving_worker::scheduler=debug"})
        self.timings = []
        self.next_id = 0
        self.cv = threading.Condition()
        self.responses = {}
        self.events = {}  # subscription -> [(t, event)]
        self.lines = 0
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain_err, daemon=True).start()
        self.hello = self.call("handshake", {})

    def _drain_err(self):
        self.stderr_tail = []
        for line in self.p.stderr:
            text = line.decode(errors="replace").rstrip()
            if "step timing" in text:
                self.timings.append({k: float(v) for k, v in re.findall(r"\b(\w+_ms|\w*steps)=([0-9.]+)", text)})
                continue
            self.stderr_tail = (self.stderr_tail + [text])[-20:]

    def _read(self):
        for line in self.p.stdout:
            t = time.perf_counter()
            msg = json.loads(line)
            with self.cv:
                if "id" in msg and msg.get("method") is None:
                    self.responses[msg["id"]] = msg
                elif msg.get("method") == "generate_event":
                    self.events.setdefault(msg["params"]["subscription"], []).append((t, msg["params"]["result"]))
                self.cv.notify_all()
        with self.cv:
            self.dead = True
            self.cv.notify_all()

    def send(self, method, params):
        self.next_id += 1
        self.p.stdin.write((json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}) + "\n").encode())
        self.p.stdin.flush()
        return self.next_id

    def wait_response(self, rid, timeout=None):
        with self.cv:
            ok = self.cv.wait_for(lambda: rid in self.responses or getattr(self, "dead", False), timeout or max(30.0, HARD - time.time()))
            if not ok or rid not in self.responses:
                raise RuntimeError(f"worker gave no response (stderr: {getattr(self, 'stderr_tail', [])})")
            msg = self.responses.pop(rid)
        if "error" in msg:
            raise RuntimeError(f"worker error: {msg['error']}")
        return msg["result"]

    def call(self, method, params):
        return self.wait_response(self.send(method, params))

    def generate(self, reqs, model="m"):
        """Send every request at once; returns per request (t_sent, [(t, event)]) when all have ended."""
        sent = []
        for i, (prompt, max_tokens) in enumerate(reqs):
            self.send_count = getattr(self, "send_count", 0) + 1
            r = {"id": f"q{self.send_count}", "model": model, "prompt": prompt, "max_tokens": max_tokens,
                 "sampling": {"temperature": 0.0}, "ignore_eos": True}
            sent.append((time.perf_counter(), self.send("generate", {"request": r})))
        subs = [(t, self.wait_response(rid)) for t, rid in sent]

        def done():
            return all(self.events.get(s) and self.events[s][-1][1]["type"] == "final" for _, s in subs) \
                or getattr(self, "dead", False)
        with self.cv:
            self.cv.wait_for(done, max(30.0, HARD - time.time()))
            out = [(t, self.events.pop(s, [])) for t, s in subs]
        for _, evs in out:
            if not evs or evs[-1][1]["type"] != "final" or evs[-1][1].get("finish_reason") == "error":
                raise RuntimeError(f"stream did not end well: {evs[-1:] if evs else 'no events'}")
        return out

    def close(self):
        try:
            self.p.stdin.close()
            self.p.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.p.kill()


def stream_stats(t_sent, evs):
    toks = [t for t, e in evs if e["type"] == "token"]
    final = evs[-1][1]
    n = final["usage"]["completion_tokens"]
    return {
        "t_first": toks[0] if toks else None, "t_last": evs[-1][0], "n": n,
        "ttft_client_s": (toks[0] - t_sent) if toks else None,
        "ttft_worker_ms": final.get("time_to_first_token_ms"), "total_worker_ms": final.get("total_ms"),
        "decode_client_tps": (len(toks) - 1) / (toks[-1] - toks[0]) if len(toks) > 2 else None,
        "decode_worker_tps": (n - 1) / ((final["total_ms"] - final["time_to_first_token_ms"]) / 1000)
        if n > 1 and final.get("total_ms") else None,
        "prompt_tokens": final["usage"]["prompt_tokens"], "cached_tokens": final["usage"].get("cached_tokens", 0),
    }


# ---------------------------------------------------------------- mlx_lm.server over HTTP

class MlxLmServer:
    def __init__(self, model, max_sequences):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.p = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm", "server", "--model", model, "--port", str(self.port),
             "--decode-concurrency", str(max_sequences), "--prompt-concurrency", str(max_sequences),
             "--log-level", "WARNING"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.model = model
        t = time.time()
        while time.time() - t < 300:
            if self.p.poll() is not None:
                raise RuntimeError("mlx_lm.server exited: " + self.p.stderr.read().decode()[-2000:])
            try:
                self.post_once("hello", 2)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("mlx_lm.server did not start")

    def post(self, text, max_tokens):
        for _ in range(200):  # http.server's listen backlog is 5: a burst of connections gets resets
            try:
                return self.post_once(text, max_tokens)
            except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
                time.sleep(0.01)
        raise ConnectionResetError("mlx_lm.server kept resetting the connection")

    def post_once(self, text, max_tokens):
        t_sent = time.perf_counter()
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=max(30.0, HARD - time.time()))
        body = json.dumps({"model": self.model, "prompt": text, "max_tokens": max_tokens, "temperature": 0.0,
                           "stream": True, "stream_options": {"include_usage": True}})
        c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            body = r.read().decode(errors="replace")[:500]
            c.close()
            return {"t_sent": t_sent, "t_first": None, "t_last": time.perf_counter(), "n": 0, "prompt_tokens": None,
                    "ttft_client_s": None, "error": f"HTTP {r.status}: {body}"}
        t_first, usage, error = None, None, None
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            msg = json.loads(data)
            if msg.get("error"):
                error = f"error event: {json.dumps(msg['error'])[:500]}"
            if msg.get("usage"):
                usage = msg["usage"]
            if t_first is None and msg.get("choices"):
                t_first = time.perf_counter()
        t_end = time.perf_counter()
        c.close()
        return {"t_sent": t_sent, "t_first": t_first, "t_last": t_end,
                "n": usage["completion_tokens"] if usage else 0,
                "prompt_tokens": usage["prompt_tokens"] if usage else None,
                "ttft_client_s": (t_first - t_sent) if t_first else None, "error": error}

    def close(self):
        self.p.terminate()
        try:
            self.p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.p.kill()


class PoolServer(MlxLmServer):
    """`mlx-serving serve` with `workers` worker processes on one device, over its OpenAI API."""

    def __init__(self, serve, worker, model_dir, workers, max_sequences, kv_bytes, device, tmp, cuda_devices=()):
        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        self.port = ports[0]
        self.model = "m"
        cfg = Path(tmp) / f"pool-{workers}.toml"
        # Workers on one GPU share its memory; spread over several (pool.cuda_visible_devices),
        # those of one GPU share it.
        per_gpu = -(-workers // len(cuda_devices)) if cuda_devices else workers
        cmd = json.dumps([worker, "--max-sequences", str(max_sequences), "--kv-cache-bytes", str(kv_bytes // per_gpu)])
        cfg.write_text(f"""[pool]
workers = {workers}
worker_command = {cmd}
device = "{device}"
cuda_visible_devices = {json.dumps(list(cuda_devices))}
max_in_flight_per_worker = {max_sequences}
start_timeout_ms = 600000
stall_timeout_ms = 600000
[http]
listen = "127.0.0.1:{ports[0]}"
max_tokens = 100000
[admin]
listen = "127.0.0.1:{ports[1]}"
[logging]
level = "warn"
[[models]]
name = "m"
path = "{model_dir}"
preload = true
""")
        log_path = Path(tmp) / f"pool-{workers}.log"
        self.log = open(log_path, "wb")
        self.p = subprocess.Popen([serve, "serve", "--config", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
        t = time.time()
        while time.time() - t < 600:
            if self.p.poll() is not None:
                raise RuntimeError(f"mlx-serving exited: {log_path.read_text()[-2000:]}")
            try:
                if self.ready_workers() >= workers:
                    self.post_once("hello", 2)
                    return
            except OSError:  # 503 until a worker is ready
                pass
            time.sleep(0.5)
        raise RuntimeError("mlx-serving did not get ready")

    def ready_workers(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=5) as r:
            return json.load(r).get("ready_workers", 0)

    def close(self):
        super().close()
        self.log.close()


def pool_model(name, mdir, a, deadline):
    """Aggregate through the supervisor with 1 and with 2 workers on the same GPU (or, with
    --pool-cuda-devices, spread over those GPUs), the two servers up side by side and their
    rounds alternated."""
    rec = R["models"].setdefault(name, {}).setdefault("pool", {})
    prompts = Prompts(mdir)
    servers = {}
    try:
        for n in a.pool_workers:
            servers[str(n)] = PoolServer(a.serve, a.binary, mdir, n, max(a.levels), a.kv_cache_bytes, a.device, a.work,
                                         a.pool_cuda_devices)
            log(f"  pool of {n} worker(s) ready")
        # The same worker called directly over its pipes, every request of a round sent at once.
        w = Worker(a.binary, a.device, max(a.levels), a.kv_cache_bytes)
        servers["direct"] = w
        w.call("load_model", {"model": "m", "path": mdir})
        order = list(servers)
        for lv in a.levels:
            # A first batch of a new size compiles kernels (MLX CUDA JIT) in each worker process:
            # one unmeasured round per server at every level.
            for s in servers.values():
                aggregate_round(s, prompts, lv, a.prompt, 8)
            rr = {n: [] for n in servers}
            for r in range(a.rounds if lv <= 32 else 1):
                for n in (order if r % 2 == 0 else order[::-1]):
                    if time.time() > deadline:
                        break
                    rr[n].append(aggregate_round(servers[n], prompts, lv, a.prompt, a.agg_tokens))
            for n, xs in rr.items():
                if not xs:
                    R["skipped"].append(f"{name}: pool of {n} at {lv} streams: time budget")
                    continue
                best = sorted(xs, key=lambda x: x["tps"])[len(xs) // 2]
                best["rounds"] = [round(x["tps"], 1) for x in xs]
                rec.setdefault(str(n), {})[str(lv)] = best
                log(f"    {n:>6} {lv:4d} streams {best['tps']:9.1f} tok/s  ttft p50 {best['ttft_p50_s'] * 1000:8.1f} ms "
                    f"p95 {best['ttft_p95_s'] * 1000:8.1f} ms  rounds {best['rounds']}")
            save()
    finally:
        for s in servers.values():
            s.close()
        for f in Path(a.work).glob("pool-*.log"):  # the supervisors' logs, for failures
            (OUT / f"{name}-{f.name}").write_bytes(f.read_bytes()[-200000:])


# ---------------------------------------------------------------- prompts

class Prompts:
    """Fresh prompts of an exact token count: windows of the tokenized fixture corpus."""

    def __init__(self, model_dir):
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        text = (ROOT / "tests/fixtures/corpus.txt").read_text(encoding="utf-8")
        self.ids = self.tok.encode(text, add_special_tokens=False).ids
        self.rng = random.Random(1234)

    def ids_of(self, n):
        out = []
        while len(out) < n:
            s = self.rng.randrange(0, len(self.ids) - 64)
            out += self.ids[s:s + n - len(out)]
        return out

    def text_of(self, n):
        """A text whose tokenization starts with a unique tag (so no prompt cache serves it), about n tokens."""
        tag = f"{self.rng.randrange(10**9)} "
        return tag + self.tok.decode(self.ids_of(n - len(self.tok.encode(tag, add_special_tokens=False).ids)))


# ---------------------------------------------------------------- parity

def parity(binary, device, only=None, n=32):
    fixtures = sorted(p for p in (ROOT / "tests/fixtures/models").iterdir()
                      if (ROOT / f"tests/fixtures/golden/{p.name}.json").exists() and (not only or p.name in only))
    rows = []
    w = Worker(binary, device, 8, 1 << 30, ["--prefix-cache-bytes", "0"])
    try:
        for m in fixtures:
            g = json.loads((ROOT / f"tests/fixtures/golden/{m.name}.json").read_text())
            w.call("load_model", {"model": m.name, "path": str(m)})
            model, _ = mlx_lm.load(str(m))
            for c in g["cases"]:
                want = c["greedy_tokens"][:n]
                (_, evs), = w.generate([({"token_ids": c["prompt_ids"]}, n)], model=m.name)
                ours = [t for _, e in evs if e["type"] == "token" for t in e["token_ids"]]
                theirs = [int(t) for t, _ in generate_step(mx.array(c["prompt_ids"]), model, max_tokens=n,
                                                           sampler=lambda lp: mx.argmax(lp, axis=-1))]

                def first_diff(a, b):
                    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
                rows.append({"model": m.name, "case": c["name"], "ours_equal_golden": ours == want,
                             "ours_first_diff": first_diff(ours, want), "mlx_lm_equal_golden": theirs == want,
                             "mlx_lm_first_diff": first_diff(theirs, want), "ours_equal_mlx_lm": ours == theirs,
                             "ours": ours, "mlx_lm": theirs, "golden": want})
            w.call("unload_model", {"model": m.name})
            del model
    finally:
        w.close()
    return rows


# ---------------------------------------------------------------- batch-1 and aggregate

def weight_bytes_per_step(model_dir):
    """Bytes of weights one decode step reads: every tensor except an untied embedding table (one row)."""
    import struct
    names = {}
    for f in Path(model_dir).glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            hdr = json.loads(fh.read(n))
        for k, v in hdr.items():
            if k != "__metadata__":
                names[k] = v["data_offsets"][1] - v["data_offsets"][0]
    total = sum(names.values())
    tied = not any(k.startswith("lm_head") for k in names)
    embed = sum(v for k, v in names.items() if "embed_tokens" in k)
    return total, (total if tied else total - embed)


def mlx_lm_batch1(model_dir, prompts, prompt_len, decode, prefill_len, runs):
    model, _ = mlx_lm.load(model_dir)
    greedy = lambda lp: mx.argmax(lp, axis=-1)  # noqa: E731
    dec, pre = [], []
    for r in range(runs + 1):  # the first is a warm-up
        ids = prompts.ids_of(prompt_len)
        t0 = time.perf_counter()
        ts = []
        for tok, _ in generate_step(mx.array(ids), model, max_tokens=decode, sampler=greedy):
            int(tok)
            ts.append(time.perf_counter())
        ids = prompts.ids_of(prefill_len)
        t1 = time.perf_counter()
        for tok, _ in generate_step(mx.array(ids), model, max_tokens=1, sampler=greedy):
            int(tok)
            t2 = time.perf_counter()
        if r:
            dec.append((len(ts) - 1) / (ts[-1] - ts[0]))
            pre.append({"ttft_s": t2 - t1, "tps": prefill_len / (t2 - t1), "ttft_short_s": ts[0] - t0})
    del model
    mx.clear_cache()
    return {"decode_tps": statistics.median(dec), "decode_runs": dec,
            "prefill_tps": statistics.median(p["tps"] for p in pre),
            "prefill_ttft_s": statistics.median(p["ttft_s"] for p in pre),
            "ttft_short_s": statistics.median(p["ttft_short_s"] for p in pre)}


def ours_batch1(w, prompts, prompt_len, decode, prefill_len, runs):
    dec, dec_w, pre, pre_w, short = [], [], [], [], []
    decode_timing = []
    for r in range(runs + 1):
        # The engine's step timing of the decode request alone (the first run warms up and
        # compiles kernels, so it is left out).
        time.sleep(0.2)
        mark = len(w.timings)
        (t, evs), = w.generate([({"token_ids": prompts.ids_of(prompt_len)}, decode)])
        s = stream_stats(t, evs)
        assert s["n"] == decode, s
        time.sleep(0.2)
        if r:
            decode_timing += w.timings[mark:]
        (t, evs), = w.generate([({"token_ids": prompts.ids_of(prefill_len)}, 1)])
        p = stream_stats(t, evs)
        if r:
            dec.append(s["decode_client_tps"])
            dec_w.append(s["decode_worker_tps"])
            short.append(s["ttft_client_s"])
            pre.append(prefill_len / p["ttft_client_s"])
            pre_w.append(prefill_len / (p["ttft_worker_ms"] / 1000))
    return {"decode_tps": statistics.median(dec), "decode_runs": dec, "decode_worker_tps": statistics.median(dec_w),
            "prefill_tps": statistics.median(pre), "prefill_worker_tps": statistics.median(pre_w),
            "prefill_ttft_s": prefill_len / statistics.median(pre), "ttft_short_s": statistics.median(short),
            "step_timing": decode_timing}


def aggregate_round(server, prompts, level, prompt_len, max_tokens):
    timing = None
    if isinstance(server, Worker):
        reqs = [({"token_ids": prompts.ids_of(prompt_len)}, max_tokens) for _ in range(level)]
        mark = len(server.timings)
        t0 = time.perf_counter()
        st = [stream_stats(t, evs) for t, evs in server.generate(reqs)]
        time.sleep(0.2)  # the engine's timing line comes when it goes idle
        timing = step_timing_mean(server.timings[mark:])
    else:
        texts = [prompts.text_of(prompt_len) for _ in range(level)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(level) as pool:
            st = list(pool.map(lambda x: server.post(x, max_tokens), texts))
    failed = [s["error"] for s in st if s.get("error")]
    if failed:
        log(f"    {len(failed)} of {level} requests failed, the first: {failed[0]}")
    if not any(s["t_first"] for s in st):
        raise RuntimeError(f"no stream of {level} got a token" + (f": {failed[0]}" if failed else ""))
    t_end = max(s["t_last"] for s in st)
    toks = sum(s["n"] for s in st)
    ttft = [s["ttft_client_s"] for s in st if s["ttft_client_s"] is not None]
    # Decode-phase rate: tokens after each stream's first, over the span from the first first-token
    # to the last token (excludes the initial prefill burst).
    t_first = min(s["t_first"] for s in st if s["t_first"])
    return {"tokens": toks, "wall_s": t_end - t0, "tps": toks / (t_end - t0),
            "decode_phase_tps": (toks - len(st)) / (t_end - t_first) if t_end > t_first else None,
            "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
            "prompt_tokens_mean": statistics.mean(s["prompt_tokens"] for s in st if s["prompt_tokens"]),
            "completions_short": sum(1 for s in st if s["n"] < max_tokens),
            "step_timing_mean_ms": timing}


def aggregate(server, prompts, levels, prompt_len, max_tokens, rounds, deadline):
    res = {}
    aggregate_round(server, prompts, 2, 16, 8)  # warm-up
    for lv in levels:
        # An unmeasured round of short completions first: the first steps at a new number of rows
        # compile and tune kernels for its shapes (a first measured round at 8 streams ran at a
        # third of the second's rate).
        if time.time() < deadline:
            aggregate_round(server, prompts, lv, prompt_len, 8)
        rr = []
        for _ in range(rounds if lv <= 32 else 1):
            if time.time() > deadline:
                break
            rr.append(aggregate_round(server, prompts, lv, prompt_len, max_tokens))
        if not rr:
            R["skipped"].append(f"aggregate level {lv} on {type(server).__name__}: time budget")
            continue
        best = sorted(rr, key=lambda x: x["tps"])[len(rr) // 2]  # median round by tokens/s
        best["rounds"] = [round(x["tps"], 1) for x in rr]
        res[str(lv)] = best
        log(f"    {type(server).__name__:12s} {lv:4d} streams {best['tps']:9.1f} tok/s  "
            f"ttft p50 {best['ttft_p50_s'] * 1000:8.1f} ms p95 {best['ttft_p95_s'] * 1000:8.1f} ms  rounds {best['rounds']}"
            + (f"  step ms build/submit/wait/prefill {'/'.join(f'{t[k]:.2f}' for k in ('build_ms', 'submit_ms', 'wait_ms', 'prefill_ms'))}"
               if (t := best.get("step_timing_mean_ms")) else "")
            + (f"; {int(t['steady_steps'])} decode-only steps: build/submit/wait "
               f"{'/'.join(f'{t[k]:.2f}' for k in ('steady_build_ms', 'steady_submit_ms', 'steady_wait_ms'))}"
               if t and t.get("steady_steps") else ""))
    return res


def bench_model(name, mdir, a, bw, deadline):
    rec = R["models"].setdefault(name, {})
    prompts = Prompts(mdir)
    total_w, step_w = weight_bytes_per_step(mdir)
    w = Worker(a.binary, a.device, max(a.levels), a.kv_cache_bytes)
    try:
        info = w.call("load_model", {"model": "m", "path": mdir})
        rec.update({"weight_bytes": total_w, "weight_bytes_per_step": step_w,
                    "kv_bytes_per_token": info["kv_bytes_per_token"], "worker_weight_bytes": info["weight_bytes"]})
        kvt = info["kv_bytes_per_token"]

        def roof(tps, streams, ctx):
            step_bytes = step_w + streams * ctx * kvt
            return {"roofline_tps": streams * bw / step_bytes, "share": tps / (streams * bw / step_bytes)}
        b1_ctx = a.prompt + a.decode / 2
        rec["batch1_ours"] = ours_batch1(w, prompts, a.prompt, a.decode, a.prefill, a.runs)
        mean = step_timing_mean(rec["batch1_ours"]["step_timing"])
        if mean:
            rec["batch1_ours"]["step_timing_mean_ms"] = mean
            log("  ours   batch-1 decode step timing (ms per step): "
                + ", ".join(f"{k[:-3]} {mean[k]:.3f}" for k in ("build_ms", "submit_ms", "wait_ms", "prefill_ms", "rest_ms")))
        rec["batch1_ours"].update(roof(rec["batch1_ours"]["decode_tps"], 1, b1_ctx))
        log(f"  ours   batch-1 decode {rec['batch1_ours']['decode_tps']:.1f} tok/s, prefill {rec['batch1_ours']['prefill_tps']:.0f} tok/s")
        save()
        rec["aggregate_ours"] = aggregate(w, prompts, a.levels, a.prompt, a.agg_tokens, a.rounds, deadline)
        for lv, x in rec["aggregate_ours"].items():
            x.update(roof(x["decode_phase_tps"] or x["tps"], int(lv), a.prompt + a.agg_tokens / 2))
        save()
    finally:
        w.close()
    if a.ours_b:
        # The same aggregate rounds from a worker started with other flags, for an A/B in one call.
        w = Worker(a.binary, a.device, max(a.levels), a.kv_cache_bytes, extra=a.ours_b)
        try:
            w.call("load_model", {"model": "m", "path": mdir})
            log(f"  ours with {' '.join(a.ours_b)}:")
            rec["aggregate_ours_b"] = {"args": a.ours_b, **aggregate(w, prompts, a.levels, a.prompt, a.agg_tokens, a.rounds, deadline)}
            save()
        finally:
            w.close()
    rec["batch1_mlx_lm"] = mlx_lm_batch1(mdir, prompts, a.prompt, a.decode, a.prefill, a.runs)
    rec["batch1_mlx_lm"].update(roof(rec["batch1_mlx_lm"]["decode_tps"], 1, b1_ctx))
    log(f"  mlx-lm batch-1 decode {rec['batch1_mlx_lm']['decode_tps']:.1f} tok/s, prefill {rec['batch1_mlx_lm']['prefill_tps']:.0f} tok/s")
    save()
    if time.time() < deadline:
        s = MlxLmServer(mdir, max(a.levels))
        try:
            rec["aggregate_mlx_lm"] = aggregate(s, prompts, a.levels, a.prompt, a.agg_tokens, a.rounds, deadline)
            for lv, x in rec["aggregate_mlx_lm"].items():
                x.update(roof(x["decode_phase_tps"] or x["tps"], int(lv), a.prompt + a.agg_tokens / 2))
        finally:
            s.close()
    else:
        R["skipped"].append(f"{name}: mlx_lm.server aggregate: time budget")
    save()


# ---------------------------------------------------------------- batch-1 variants

def mlx_lm_batch1_child(argv):
    """`bench.py --mlx-lm-batch1 MODEL_DIR PROMPT DECODE PREFILL RUNS`: mlx-lm's batch-1 figures in
    this process, whose environment (MLX_* variables) MLX reads once; one JSON line on stdout."""
    mdir, prompt, decode, prefill, runs = argv[0], *map(int, argv[1:5])
    print(json.dumps(mlx_lm_batch1(mdir, Prompts(mdir), prompt, decode, prefill, runs)))


def step_timing_mean(t):
    """Means per step over the worker's timing lines; `steady_*`: over the steps that only decoded
    (no prefill chunk, no row joining or leaving), when there were any."""
    n = sum(x["steps"] for x in t)
    if not n:
        return None
    out = {k: sum(x[k] * x["steps"] for x in t) / n for k in ("build_ms", "submit_ms", "wait_ms", "prefill_ms", "rest_ms")}
    m = sum(x.get("steady_steps", 0) for x in t)
    out["steady_steps"] = m
    if m:
        out.update({k: sum(x[k] * x["steady_steps"] for x in t if x.get("steady_steps")) / m
                    for k in ("steady_build_ms", "steady_submit_ms", "steady_wait_ms")})
    return out


def variants_model(name, mdir, a):
    """Batch-1 decode of our worker with and without stacked projections, and of mlx-lm, under each
    MLX_MAX_OPS_PER_BUFFER value (kernels per CUDA graph that MLX launches; 0: MLX's default)."""
    rec = R["models"].setdefault(name, {})
    rec["variants"] = out = []
    prompts = Prompts(mdir)
    for rnd, ops in enumerate(a.variant_ops):
        env = {"MLX_MAX_OPS_PER_BUFFER": str(ops)} if ops else {}
        probe = host_probe()
        log(f"  host probe: {probe}")
        # mlx-lm first every other round, so that a drift of the host's speed favours neither.
        if rnd % 2:
            mlx_lm_variant(out, mdir, a, ops, env, probe)
        for stack in a.variant_stack:
            w = Worker(a.binary, a.device, 8, a.kv_cache_bytes, extra=["--stack-projections", stack], env=env)
            try:
                w.call("load_model", {"model": "m", "path": mdir})
                r = ours_batch1(w, prompts, a.prompt, a.decode, a.prefill, a.runs)
            finally:
                w.close()
            r["step_timing_mean_ms"] = step_timing_mean(r.pop("step_timing"))
            out.append({"engine": "ours", "stack_projections": stack, "max_ops_per_buffer": ops, "host": probe, **r})
            log(f"  ours   ops/buffer {ops or 'default'} stacked {stack}: decode {r['decode_tps']:.1f} tok/s "
                f"{[round(x, 1) for x in r['decode_runs']]}, step ms {r['step_timing_mean_ms']}")
            save()
        if not rnd % 2:
            mlx_lm_variant(out, mdir, a, ops, env, probe)


def mlx_lm_variant(out, mdir, a, ops, env, probe):
    """mlx-lm's batch-1 figures under `env`, in a child process."""
    c = subprocess.run([sys.executable, __file__, "--mlx-lm-batch1", mdir, str(a.prompt), str(a.decode), str(a.prefill), str(a.runs)],
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=max(60.0, HARD - time.time()))
    if c.returncode != 0:
        raise RuntimeError(f"mlx-lm batch-1 failed: {c.stderr[-2000:]}")
    r = json.loads(c.stdout.strip().splitlines()[-1])
    out.append({"engine": "mlx-lm", "max_ops_per_buffer": ops, "host": probe, **r})
    log(f"  mlx-lm ops/buffer {ops or 'default'}: decode {r['decode_tps']:.1f} tok/s {[round(x, 1) for x in r['decode_runs']]}")
    save()


def trace_model(name, mdir, a):
    """One batch-1 decode request of each engine with its device timeline recorded (cupti_trace.cpp,
    after a warm-up request): what the GPU runs per step, and how long it waits between kernels."""
    import timeline
    rec = R["models"].setdefault(name, {})
    rec["trace"] = out = {}
    prompts = Prompts(mdir)
    tdir = Path("/tmp/gpu-trace")
    tdir.mkdir(exist_ok=True)
    for label in a.trace_engines:
        csv, switch = tdir / f"{name}-{label}.csv", tdir / f"{name}-{label}.on"
        switch.unlink(missing_ok=True)
        env = {"LD_PRELOAD": a.trace, "CUPTI_TRACE_OUT": str(csv), "CUPTI_TRACE_SWITCH": str(switch)}
        if label == "mlx-lm":
            c = subprocess.run([sys.executable, __file__, "--mlx-lm-trace", mdir, str(a.prompt), str(a.decode), str(switch)],
                               env={**os.environ, **env}, capture_output=True, text=True, timeout=max(60.0, HARD - time.time()))
            if c.returncode != 0:
                raise RuntimeError(f"mlx-lm trace failed: {c.stderr[-2000:]}")
            r = json.loads(c.stdout.strip().splitlines()[-1])
        else:
            stack = "false" if label == "ours-separate" else "true"
            w = Worker(a.binary, a.device, 8, a.kv_cache_bytes, extra=["--stack-projections", stack], env=env)
            try:
                w.call("load_model", {"model": "m", "path": mdir})
                w.generate([({"token_ids": prompts.ids_of(a.prompt)}, a.decode)])
                switch.touch()
                time.sleep(0.05)
                mark = len(w.timings)
                (t, evs), = w.generate([({"token_ids": prompts.ids_of(a.prompt)}, a.decode)])
                time.sleep(0.05)
                switch.unlink()
                time.sleep(0.5)
                s = stream_stats(t, evs)
                r = {"decode_tps": s["decode_client_tps"], "step_timing_mean_ms": step_timing_mean(w.timings[mark:])}
            finally:
                w.close()
        try:
            r.update(timeline.summary(str(csv), a.decode))
        except Exception as e:  # noqa: BLE001
            r["trace_error"] = repr(e)
        out[label] = r
        log(f"  trace {label}: decode {r.get('decode_tps') or 0:.1f} tok/s; per step: GPU span {r.get('gpu_span_us')} us, "
            f"busy {r.get('gpu_busy_us')}, idle {r.get('gpu_idle_us')} ({r.get('gpu_idle_in_gaps_of_20us_or_more_us')} in "
            f"{r.get('gaps_of_20us_or_more')} gaps >= 20 us), {r.get('kernels')} kernels, {r.get('copies')} copies "
            f"{r.get('trace_error', '')}")
        for k in r.get("top_kernels", [])[:12]:
            log(f"    {k['us_per_step']:>8} us {k['per_step']:>6}x  {k['name'][:110]}")
        for d in r.get("driver_calls", [])[:6]:
            log(f"    host {d['host_us_per_step']:>8} us {d['per_step']:>6}x  {d['name']}")
        save()


def mlx_lm_trace_child(argv):
    """`bench.py --mlx-lm-trace MODEL_DIR PROMPT DECODE SWITCH`: one batch-1 decode of mlx-lm's
    generate_step after a warm-up, with SWITCH present while it runs; one JSON line on stdout."""
    mdir, prompt, decode, switch = argv[0], int(argv[1]), int(argv[2]), Path(argv[3])
    model, _ = mlx_lm.load(mdir)
    prompts = Prompts(mdir)
    greedy = lambda lp: mx.argmax(lp, axis=-1)  # noqa: E731
    for measured in (False, True):
        ids = prompts.ids_of(prompt)
        if measured:
            switch.touch()
            time.sleep(0.05)
        ts = []
        for tok, _ in generate_step(mx.array(ids), model, max_tokens=decode, sampler=greedy):
            int(tok)
            ts.append(time.perf_counter())
        if measured:
            time.sleep(0.05)
            switch.unlink()
            time.sleep(0.5)
    print(json.dumps({"decode_tps": (len(ts) - 1) / (ts[-1] - ts[0])}))


def trace_table(L):
    rows = [(name, label, r) for name, m in R.get("models", {}).items() for label, r in m.get("trace", {}).items()]
    if not rows:
        return
    L += ["", "Device timeline of one batch-1 decode request (per step, us):", "",
          "| model | engine | decode tok/s (traced) | GPU span | GPU busy | GPU idle | of it in gaps >= 20 us | kernels | kernel time | copies |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for name, label, r in rows:
        L.append(f"| {name} | {label} | {r.get('decode_tps') or 0:.1f} | {r.get('gpu_span_us')} | {r.get('gpu_busy_us')} | "
                 f"{r.get('gpu_idle_us')} | {r.get('gpu_idle_in_gaps_of_20us_or_more_us')} | {r.get('kernels')} | "
                 f"{r.get('kernel_us')} | {r.get('copies')} |")


def step_ops(name, mdir, binary):
    """Operations of one decode step on this device: ours (stacked and separate projections), mlx-lm's."""
    rec = R["models"].setdefault(name, {})
    rec["step_ops"] = {}
    for arg in ("stacked", "separate"):
        c = subprocess.run([binary, mdir, "1", arg, "time"], capture_output=True, text=True, timeout=300)
        rec["step_ops"][f"ours {arg}"] = c.stdout if c.returncode == 0 else f"failed: {c.stderr[-1000:]}"
    c = subprocess.run([sys.executable, str(ROOT / "benches/step_ops.py"), mdir, "time"], capture_output=True, text=True, timeout=300)
    rec["step_ops"]["mlx-lm"] = c.stdout if c.returncode == 0 else f"failed: {c.stderr[-1000:]}"
    for k, v in rec["step_ops"].items():
        lines = v.splitlines()
        log(f"  step ops {k}: {lines[0] if lines else ''} | {next((x for x in lines if x.startswith('timed')), '')}")
    save()


def variants_table(L):
    rows = [(name, v) for name, m in R.get("models", {}).items() for v in m.get("variants", [])]
    if not rows:
        return
    L.append("")
    L.append("| model | MLX_MAX_OPS_PER_BUFFER | engine | stacked projections | decode tok/s (median) | runs | step ms: build / async_eval / wait | host probe ms |")
    L.append("|---|---|---|---|---|---|---|---|")
    for name, v in rows:
        t = v.get("step_timing_mean_ms")
        st = f"{t['build_ms']:.2f} / {t['submit_ms']:.2f} / {t['wait_ms']:.2f}" if t else "-"
        L.append(f"| {name} | {v['max_ops_per_buffer'] or 'default'} | {v['engine']} | {v.get('stack_projections', '-')} | "
                 f"{v['decode_tps']:.1f} | {[round(x, 1) for x in v['decode_runs']]} | {st} | {v.get('host', {}).get('loop_ms', '-')} |")
    for name, m in R.get("models", {}).items():
        for k, v in m.get("step_ops", {}).items():
            lines = v.splitlines()
            L.append(f"\n{name}, {k}: {lines[0] if lines else '-'} | {next((x for x in lines if x.startswith('timed')), '')}")


# ---------------------------------------------------------------- table

def table():
    L = []
    bw = R.get("bandwidth", {}).get("bytes_per_s")
    L.append(f"device: {R['env'].get('nvidia_smi')} | mlx {R['env']['mlx']} ({R['env']['device']}), mlx-lm {R['env']['mlx_lm']}")
    if bw:
        L.append(f"measured copy bandwidth: {bw / 1e12:.2f} TB/s (read + write of a {R['bandwidth']['array_bytes'] / 2**30:.0f} GiB bf16 array, median)")
    variants_table(L)
    trace_table(L)
    if not any(m.get("batch1_ours") or m.get("aggregate_ours") for m in R.get("models", {}).values()):
        L = L[:-1] if L and L[-1] == "" else L  # the pool alone (--pool)
        return pool_table(L)
    L.append("")
    L.append("| model | weights GB | ours decode tok/s | mlx-lm decode tok/s | ratio | ours % roofline | mlx-lm % roofline | ours prefill tok/s | mlx-lm prefill tok/s |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for name, m in R.get("models", {}).items():
        o, p = m.get("batch1_ours"), m.get("batch1_mlx_lm")
        if not o or not p:
            continue
        L.append(f"| {name} | {m['weight_bytes'] / 1e9:.2f} | {o['decode_tps']:.1f} | {p['decode_tps']:.1f} | "
                 f"{o['decode_tps'] / p['decode_tps']:.2f}x | {o['share'] * 100:.0f} % | {p['share'] * 100:.0f} % | "
                 f"{o['prefill_tps']:.0f} | {p['prefill_tps']:.0f} |")
    L.append("")
    L.append("| model | streams | ours tok/s | mlx_lm.server tok/s | ratio | ours TTFT p50 / p95 ms | mlx_lm.server TTFT p50 / p95 ms | ours decode-phase % roofline | ours x one stream |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for name, m in R.get("models", {}).items():
        o, p = m.get("aggregate_ours", {}), m.get("aggregate_mlx_lm", {})
        for lv in sorted(set(o) | set(p), key=int):
            a, b = o.get(lv), p.get(lv)
            f = lambda x: f"{x['tps']:.0f}" if x else "-"  # noqa: E731
            t = lambda x: f"{x['ttft_p50_s'] * 1000:.0f} / {x['ttft_p95_s'] * 1000:.0f}" if x else "-"  # noqa: E731
            ratio = f"{a['tps'] / b['tps']:.2f}x" if a and b else "-"
            x1 = f"{a['tps'] / o['1']['tps']:.1f}x" if a and o.get("1") else "-"
            L.append(f"| {name} | {lv} | {f(a)} | {f(b)} | {ratio} | {t(a)} | {t(b)} | "
                     f"{a['share'] * 100:.0f} % | {x1} |" if a else f"| {name} | {lv} | - | {f(b)} | - | - | {t(b)} | - | - |")
    return pool_table(L)


def pool_table(L):
    pools = {name: m["pool"] for name, m in R.get("models", {}).items() if m.get("pool")}
    if pools:
        L.append("")
        spread = R.get("args", {}).get("pool_cuda_devices")
        if spread:
            L.append(f"Each pool's workers spread over CUDA_VISIBLE_DEVICES {', '.join(spread)} (pool.cuda_visible_devices).")
            L.append("")
        L.append("| model | streams | workers behind the supervisor (direct: one worker over its pipes) | tok/s | x one worker | TTFT p50 / p95 ms | rounds tok/s |")
        L.append("|---|---|---|---|---|---|---|")
        for name, p in pools.items():
            levels = sorted({lv for per in p.values() for lv in per}, key=int)
            for lv in levels:
                base = p.get("1", {}).get(lv)
                for n in sorted(p, key=lambda k: (not k.isdigit(), k)):
                    x = p[n].get(lv)
                    if not x:
                        continue
                    rel = f"{x['tps'] / base['tps']:.2f}x" if base else "-"
                    L.append(f"| {name} | {lv} | {n} | {x['tps']:.0f} | {rel} | {x['ttft_p50_s'] * 1000:.0f} / "
                             f"{x['ttft_p95_s'] * 1000:.0f} | {x['rounds']} |")
    if R.get("parity"):
        L.append("")
        dev = R["env"]["device"]
        L.append(f"| fixture model | case | ours ({dev}) = CPU golden, first 32 | first diff | mlx-lm ({dev}) = CPU golden | first diff |")
        L.append("|---|---|---|---|---|---|")
        for r in R["parity"]:
            L.append(f"| {r['model']} | {r['case']} | {'yes' if r['ours_equal_golden'] else 'NO'} | {r['ours_first_diff']} | "
                     f"{'yes' if r['mlx_lm_equal_golden'] else 'NO'} | {r['mlx_lm_first_diff']} |")
        parity_tokens(L, dev)
    if R["skipped"]:
        L.append("")
        L.append("skipped: " + "; ".join(R["skipped"]))
    return "\n".join(L) + "\n"


def parity_tokens(L, dev):
    """The first greedy tokens of each parity case: the CPU golden's, then the device's where they
    differ (from the first differing token on, in bold)."""
    L.append("")
    L.append(f"First {max(len(r['golden']) for r in R['parity'])} greedy tokens of each case: the CPU golden (mlx-lm on the CPU), "
             f"then ours and mlx-lm's on {dev} where they differ from it:")
    L.append("")

    def ids(tokens, diff=None):
        return " ".join(f"**{t}**" if diff is not None and i >= diff else str(t) for i, t in enumerate(tokens))
    for r in R["parity"]:
        L.append(f"- {r['model']} / {r['case']}, CPU: {ids(r['golden'])}")
        if r["ours_equal_golden"] and r["mlx_lm_equal_golden"]:
            L.append(f"  - ours and mlx-lm on {dev}: the same")
            continue
        if r["ours_equal_mlx_lm"]:
            L.append(f"  - ours = mlx-lm on {dev}, from token {r['ours_first_diff']}: {ids(r['ours'], r['ours_first_diff'])}")
        else:
            L.append(f"  - ours on {dev}: {ids(r['ours'], r['ours_first_diff'])}")
            L.append(f"  - mlx-lm on {dev}: {ids(r['mlx_lm'], r['mlx_lm_first_diff'])}")


def render(path):
    """`bench.py --render RESULTS.json`: the tables of an earlier run, from its results file."""
    R.update(json.loads(Path(path).read_text()))
    R.setdefault("skipped", [])
    print(table(), end="")


def main():
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/gpu-bench-models")
    ap.add_argument("--binary", default=str(ROOT / "target/release/mlx-serving-worker"))
    ap.add_argument("--device", default="gpu")
    ap.add_argument("--models", nargs="+", default=["qwen3-0.6b-bf16", "qwen3-0.6b-q4", "llama3-8b-bf16", "llama3-8b-q4"])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--agg-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kv-cache-bytes", type=int, default=48 << 30)
    ap.add_argument("--bw-gib", type=float, default=4.0)
    ap.add_argument("--budget-s", type=float, default=520, help="stop starting work after this many seconds")
    ap.add_argument("--est", default="qwen3-0.6b=120,llama3-8b-bf16=150,llama3-8b-q4=270,parity=170,qwen3-tiny=20,llama3-tiny=20",
                    help="seconds each model is expected to take (made + measured), to skip what would not fit")
    ap.add_argument("--grace-s", type=float, default=45, help="after the budget, how long a started step may still wait")
    ap.add_argument("--parity-models", nargs="*", help="fixture models for the parity step (default: all)")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--serve", help="mlx-serving (the supervisor): with --pool-workers, measure the pool instead")
    ap.add_argument("--pool-workers", type=int, nargs="*", default=[1, 2],
                    help="with --pool: pool sizes on the one device, measured side by side")
    ap.add_argument("--pool-cuda-devices", nargs="*", default=[],
                    help="with --pool: spread each pool's workers over these GPUs (pool.cuda_visible_devices), "
                         "e.g. 0 1 on a 2-GPU machine: one worker per GPU")
    ap.add_argument("--pool", action="store_true",
                    help="only the aggregate through the supervisor, for each pool size (needs --serve)")
    ap.add_argument("--variants", action="store_true",
                    help="only batch-1 decode, of ours with stacked projections and without and of mlx-lm, per --variant-ops")
    ap.add_argument("--variant-ops", type=int, nargs="+", default=[0, 100], help="MLX_MAX_OPS_PER_BUFFER values (0: MLX's default)")
    ap.add_argument("--variant-stack", nargs="+", default=["true", "false"])
    ap.add_argument("--trace", help="cupti_trace.so: record one traced batch-1 decode of each engine in --trace-engines (with --variants: as well)")
    ap.add_argument("--trace-engines", nargs="+", default=["ours-stacked", "ours-separate", "mlx-lm"])
    ap.add_argument("--ours-b", nargs="+", metavar="FLAG",
                    help="also measure the aggregate rounds of a worker started with these flags (an A/B), e.g. "
                         "--ours-b=--padded-attention-kernel=false")
    ap.add_argument("--step-ops", help="the step_ops example binary: count one decode step's operations of each model")
    a = ap.parse_args()
    OUT = Path(a.out)
    OUT.mkdir(parents=True, exist_ok=True)
    deadline = T0 + a.budget_s
    global HARD
    HARD = deadline + a.grace_s
    R["args"] = vars(a)
    R["env"] = environment(a.device)
    R["env"]["host_probe"] = host_probe()
    log("env", R["env"])
    R["bandwidth"] = copy_bandwidth(a.bw_gib)
    bw = R["bandwidth"]["bytes_per_s"]
    log(f"copy bandwidth {bw / 1e12:.3f} TB/s (best {R['bandwidth']['best_bytes_per_s'] / 1e12:.3f})")
    save()
    import bench_models as mm
    tok = mm.fx.train_tokenizer(mm.fx.CORPUS.read_text(encoding="utf-8"))
    est = dict(kv.split("=") for kv in a.est.split(","))
    R["models"] = {}
    steps = list(a.models)
    if not a.skip_parity and not a.pool:  # after the first three models: the performance figures come first
        steps.insert(min(3, len(steps)), "parity")
    for name in steps:
        guess = next((float(v) for k, v in est.items() if name.startswith(k)), 120.0)
        if time.time() + guess > deadline:
            R["skipped"].append(f"{name}: time budget ({deadline - time.time():.0f}s left, ~{guess:.0f}s needed)")
            log("skip", name)
            continue
        if name == "parity":
            try:
                R["parity"] = parity(a.binary, a.device, a.parity_models)
                ok = sum(r["ours_equal_golden"] for r in R["parity"])
                log(f"parity: ours = golden in {ok}/{len(R['parity'])} cases; mlx-lm = golden in "
                    f"{sum(r['mlx_lm_equal_golden'] for r in R['parity'])}; ours = mlx-lm in {sum(r['ours_equal_mlx_lm'] for r in R['parity'])}")
            except Exception as e:  # noqa: BLE001
                R["parity_error"] = repr(e)
                log("parity failed:", repr(e))
            save()
            (OUT / "table.md").write_text(table())
            continue
        log("model", name)
        try:
            R["models"][name] = {"made": mm.build(name, Path(a.work) / name, tok)}
            if a.step_ops:
                step_ops(name, str(Path(a.work) / name), a.step_ops)
            if a.trace:
                trace_model(name, str(Path(a.work) / name), a)
            if a.variants:
                variants_model(name, str(Path(a.work) / name), a)
            elif a.pool:
                pool_model(name, str(Path(a.work) / name), a, deadline)
            elif not a.trace:
                bench_model(name, str(Path(a.work) / name), a, bw, deadline)
        except Exception as e:  # noqa: BLE001
            R["models"].setdefault(name, {})["error"] = repr(e)
            log("model failed:", name, repr(e))
        save()
        (OUT / "table.md").write_text(table())
        import shutil
        shutil.rmtree(Path(a.work) / name, ignore_errors=True)
    R["elapsed_s"] = time.time() - T0
    save()
    t = table()
    (OUT / "table.md").write_text(t)
    print(t)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--mlx-lm-batch1"]:
        mlx_lm_batch1_child(sys.argv[2:])
    elif sys.argv[1:2] == ["--mlx-lm-trace"]:
        mlx_lm_trace_child(sys.argv[2:])
    elif sys.argv[1:2] == ["--render"]:
        render(sys.argv[2])
    else:
        main()
