"""Aggregate decode throughput of one mlx-serving worker against mlx_lm.server, side by side.

For each concurrency level, sends that many 64-token greedy completions at once to each
server in turn (ours over the worker's stdin/stdout protocol, mlx_lm.server over HTTP), several
rounds each with fresh prompts, and reports the median aggregate tokens/s (completion tokens of
the round / the round's wall time) and the ratio.

    python benches/worker.py --model tests/fixtures/models/qwen3-bf16 --levels 1 8 32
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prompts(level, rnd):
    return [f"Round {rnd}, request {i}: tell me about the license and what it allows." for i in range(level)]


class Worker:
    """mlx-serving-worker over its pipes."""

    name = "mlx-serving"

    def __init__(self, binary, model, max_sequences):
        self.p = subprocess.Popen(
            [binary, "--model", model, "--model-name", "m", "--max-sequences", str(max_sequences)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.next_id = 0
        self.call("handshake", {})

    def send(self, method, params):
        self.next_id += 1
        self.p.stdin.write(json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}) + "\n")
        self.p.stdin.flush()
        return self.next_id

    def call(self, method, params):
        rid = self.send(method, params)
        while True:
            msg = json.loads(self.p.stdout.readline())
            if msg.get("id") == rid:
                return msg["result"]

    def round(self, texts, max_tokens):
        start = time.perf_counter()
        subs, pending, tokens, ttft = {}, {}, 0, []
        for i, t in enumerate(texts):
            rid = self.send("generate", {"request": {"id": f"r{i}", "model": "m", "prompt": {"text": t}, "max_tokens": max_tokens}})
            pending[rid] = i
        done = 0
        while done < len(texts):
            msg = json.loads(self.p.stdout.readline())
            if msg.get("id") in pending:
                subs[msg["result"]] = pending.pop(msg["id"])
            elif msg.get("method") == "generate_event":
                ev = msg["params"]["result"]
                if ev["type"] == "final":
                    done += 1
                    tokens += ev["usage"]["completion_tokens"]
                    if ev.get("time_to_first_token_ms") is not None:
                        ttft.append(ev["time_to_first_token_ms"] / 1000)
        return tokens, time.perf_counter() - start

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=10)


class MlxLmServer:
    """mlx_lm.server over HTTP, one connection per request."""

    name = "mlx_lm.server"

    def __init__(self, python, model, max_sequences):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.p = subprocess.Popen(
            [python, "-m", "mlx_lm", "server", "--model", model, "--port", str(self.port),
             "--decode-concurrency", str(max_sequences), "--prompt-concurrency", str(max_sequences),
             "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.model = model
        for _ in range(600):
            try:
                self.post_once("hello", 1)
                return
            except OSError:
                time.sleep(0.1)
        sys.exit("mlx_lm.server did not start")

    def post(self, text, max_tokens):
        # http.server listens with a backlog of 5: many connections at once get reset, and a
        # client retries (the time counts against the server).
        for _ in range(100):
            try:
                return self.post_once(text, max_tokens)
            except ConnectionResetError:
                time.sleep(0.01)
        raise ConnectionResetError("mlx_lm.server kept resetting the connection")

    def post_once(self, text, max_tokens):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        body = json.dumps({"model": self.model, "prompt": text, "max_tokens": max_tokens, "temperature": 0.0})
        c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        data = json.loads(r.read())
        c.close()
        return data["usage"]["completion_tokens"]

    def round(self, texts, max_tokens):
        start = time.perf_counter()
        with ThreadPoolExecutor(len(texts)) as pool:
            tokens = sum(pool.map(lambda t: self.post(t, max_tokens), texts))
        return tokens, time.perf_counter() - start

    def close(self):
        self.p.terminate()
        self.p.wait(timeout=10)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--python", default=sys.executable, help="python with mlx-lm installed")
    ap.add_argument("--binary", default=str(ROOT / "target/release/mlx-serving-worker"))
    a = ap.parse_args()
    model = os.path.abspath(a.model)
    top = max(a.levels)
    servers = [Worker(a.binary, model, top), MlxLmServer(a.python, model, top)]
    try:
        for s in servers:  # warm-up
            s.round(prompts(2, -1), 8)
        print(f"model {model}, {a.max_tokens}-token greedy completions, {a.rounds} rounds per level")
        for level in a.levels:
            med = {}
            for s in servers:
                rates, counts = [], []
                for rnd in range(a.rounds):
                    tokens, secs = s.round(prompts(level, rnd), a.max_tokens)
                    rates.append(tokens / secs)
                    counts.append(tokens)
                med[s.name] = statistics.median(rates)
                print(f"  {level:3d} streams  {s.name:14s} {med[s.name]:8.1f} tokens/s  (tokens per round {counts})", flush=True)
            print(f"  {level:3d} streams  ratio {med['mlx-serving'] / med['mlx_lm.server']:.2f}x")
    finally:
        for s in servers:
            s.close()


if __name__ == "__main__":
    main()
