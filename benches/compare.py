"""mlx-serving against mlx_lm.server, side by side, through the whole HTTP stack.

Starts `mlx-serving serve` (one worker by default) and `mlx_lm.server` on the same model, then
runs the same workload (`mlx-serving-bench run`: streamed greedy completions, the same prompts
and max_tokens for both) at each concurrency level against one server and then the other,
alternating which goes first from round to round, and prints the medians over the rounds and
their ratios:

- aggregate output tokens/s at the highest level (32 by default) and its TTFT p50 and p95;
- single-stream decode tokens/s at concurrency 1 (tokens after the first over the time after
  the first, per request; the median request of each run);
- the same figures for any other level given (e.g. --levels 1 8 32).

Every run's JSON report lands in the results directory, with summary.json and both servers'
logs.

    python benches/compare.py --python .venv-bench/bin/python --rounds 3 --levels 1 8 32
"""
import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except OSError as e:
        return getattr(e, "code", None)


def wait_until(proc, url, name, timeout_s, log_path):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = "".join(Path(log_path).read_text(errors="replace").splitlines(keepends=True)[-20:])
            sys.exit(f"{name} exited ({proc.returncode}) before it was ready; the end of {log_path}:\n{tail}")
        if http_status(url) == 200:
            return
        time.sleep(0.1)
    sys.exit(f"{name} was not ready within {timeout_s} s")


class Ours:
    name = "mlx-serving"

    def __init__(self, a, results):
        self.port = free_port()
        config = results / "mlx-serving.toml"
        config.write_text(
            f'[pool]\nworkers = {a.workers}\n' + "".join(f"{kv}\n" for kv in a.pool) +
            f'\n[http]\nlisten = "127.0.0.1:{self.port}"\n\n'
            f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n\n'
            f'[[models]]\nname = "m"\npath = "{a.model}"\npreload = true\n'
        )
        self.log_path = results / "mlx-serving.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([a.binary, "serve", "--config", str(config)], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
        self.url, self.model = f"http://127.0.0.1:{self.port}", "m"
        wait_until(self.proc, self.url + "/ready", self.name, a.start_timeout, self.log_path)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Peer:
    name = "mlx_lm.server"

    def __init__(self, a, results):
        self.port = free_port()
        self.log_path = results / "mlx_lm.server.log"
        self.log = open(self.log_path, "w")
        cmd = [a.python, "-m", "mlx_lm", "server", "--model", a.model, "--port", str(self.port), "--log-level", "WARNING"]
        self.proc = subprocess.Popen(cmd + shlex.split(a.peer_args), stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # mlx_lm.server maps the model name `default_model` to the --model it loaded.
        self.url, self.model = f"http://127.0.0.1:{self.port}", "default_model"
        wait_until(self.proc, self.url + "/health", self.name, a.start_timeout, self.log_path)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def bench(a, server, args, json_path=None):
    cmd = [a.bench, "run", "--url", server.url, "--model", server.model, "--api", a.api, "--tokenizer", a.model,
           "--label", server.name, "--quiet", *args]
    if json_path:
        cmd += ["--json", str(json_path)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"mlx-serving-bench failed against {server.name} ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(json_path.read_text()) if json_path else None


def figures(report):
    lat, dec = report["latency_ms"], report["decode_tokens_per_s"] or {}
    ttft = lat["ttft"] or {}
    return {
        "output_tokens_per_s": report["throughput"]["output_tokens_per_s"],
        "ttft_p50_ms": ttft.get("p50"),
        "ttft_p95_ms": ttft.get("p95"),
        "decode_tokens_per_s_p50": dec.get("p50"),
        "e2e_p50_ms": (lat["e2e"] or {}).get("p50"),
        "completion_tokens": report["tokens"]["completion"],
        "errors": report["errors"]["count"],
        "connect_retries": report["requests"]["connect_retries"],
    }


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(ours, peer):
    return ours / peer if ours is not None and peer else None


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def load_average():
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def machine():
    info = {"cpus": os.cpu_count(), "platform": sys.platform}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "tests/fixtures/models/qwen3-bf16"), help="model directory (mlx-community layout)")
    ap.add_argument("--workers", type=int, default=1, help="workers of mlx-serving (default 1)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per server and level (default 3)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 32], help="concurrency levels (default 1 32)")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per run (default: 2 x the level, at least 8)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    ap.add_argument("--prompt-len", default="uniform:32-128", help="prompt tokens, a distribution (default uniform:32-128)")
    ap.add_argument("--api", choices=["completions", "chat"], default="completions")
    ap.add_argument("--results", default=None, help="directory for the JSON reports (default target/bench-results/DATE)")
    ap.add_argument("--python", default=sys.executable, help="python with mlx-lm installed")
    ap.add_argument("--pool", action="append", default=[], metavar="KEY=VALUE",
                    help="a [pool] setting of mlx-serving's config, in TOML (repeatable), e.g. stall_timeout_ms=60000")
    ap.add_argument("--peer-args", default="", help="extra mlx_lm.server arguments, e.g. '--prompt-concurrency 32'")
    ap.add_argument("--binary", default=str(ROOT / "target/release/mlx-serving"))
    ap.add_argument("--bench", default=str(ROOT / "target/release/mlx-serving-bench"))
    ap.add_argument("--start-timeout", type=float, default=300, help="seconds each server may take to load")
    a = ap.parse_args()
    errors = []
    if a.workers < 1:
        errors.append("--workers must be at least 1")
    if a.rounds < 1:
        errors.append("--rounds must be at least 1")
    if any(level < 1 for level in a.levels):
        errors.append("--levels must all be at least 1")
    if a.requests is not None and a.requests < 1:
        errors.append("--requests must be at least 1")
    for kv in a.pool:
        if "=" not in kv or not kv.split("=", 1)[0].strip():
            errors.append(f"--pool {kv!r}: expected KEY=VALUE, e.g. stall_timeout_ms=60000")
    if a.max_tokens < 1:
        errors.append("--max-tokens must be at least 1")
    a.model = os.path.abspath(a.model)
    if not (Path(a.model) / "config.json").is_file():
        errors.append(f"--model {a.model}: no config.json there")
    for path, what in [(a.binary, "--binary"), (a.bench, "--bench")]:
        if not os.access(path, os.X_OK):
            errors.append(f"{what} {path} is missing: build it (cargo build --release)")
    if errors:
        ap.error("; ".join(errors))

    results = Path(a.results or ROOT / "target/bench-results" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    results.mkdir(parents=True, exist_ok=True)
    levels = sorted(set(a.levels))
    print(f"model {a.model}; mlx-serving with {a.workers} worker(s); {a.rounds} rounds; levels {levels}; "
          f"max_tokens {a.max_tokens}; prompts {a.prompt_len} tokens; /v1/{'chat/' if a.api == 'chat' else ''}completions, streamed, greedy")
    print(f"results in {results}", flush=True)

    servers = []
    runs = []
    try:
        servers = [Ours(a, results), Peer(a, results)]
        for s in servers:  # warm-up: first allocations, compiled kernels, the prompt cache path
            bench(a, s, ["--concurrency", "4", "--requests", "8", "--max-tokens", "16", "--seed", "1"])
        for rnd in range(a.rounds):
            for level in levels:
                n = a.requests or max(8, 2 * level)
                order = servers if rnd % 2 == 0 else servers[::-1]
                for s in order:
                    path = results / f"round{rnd + 1}-c{level}-{s.name}.json"
                    load = load_average()
                    report = bench(a, s, ["--concurrency", str(level), "--requests", str(n), "--max-tokens", f"fixed:{a.max_tokens}",
                                          "--prompt-len", a.prompt_len, "--seed", str(1000 * (rnd + 1) + level)], path)
                    f = figures(report)
                    runs.append({"round": rnd + 1, "level": level, "server": s.name, "load_average": load, "json": path.name, **f})
                    print(f"round {rnd + 1}  c={level:<3d} {s.name:14s} {fmt(f['output_tokens_per_s']):>7} tokens/s  "
                          f"ttft p50 {fmt(f['ttft_p50_ms'], 0):>6} p95 {fmt(f['ttft_p95_ms'], 0):>6} ms  "
                          f"decode p50 {fmt(f['decode_tokens_per_s_p50']):>6} tokens/s  "
                          f"{f['completion_tokens']} tokens, {f['errors']} errors, {f['connect_retries']} connect retries  (load {fmt(load, 2)})", flush=True)
    finally:
        for s in servers:
            s.stop()

    names = [s.name for s in servers]
    table = {}
    for level in levels:
        table[level] = {}
        for name in names:
            mine = [r for r in runs if r["level"] == level and r["server"] == name]
            table[level][name] = {k: median(r[k] for r in mine) for k in
                                  ["output_tokens_per_s", "ttft_p50_ms", "ttft_p95_ms", "decode_tokens_per_s_p50", "e2e_p50_ms"]}
            table[level][name]["errors"] = sum(r["errors"] for r in mine)

    print()
    print(f"medians of {a.rounds} rounds (ratio: mlx-serving / mlx_lm.server)")
    print(f"  {'level':<6}{'figure':<26}{'mlx-serving':>12}{'mlx_lm.server':>15}{'ratio':>8}")
    for level in levels:
        for key, label in [("output_tokens_per_s", "output tokens/s"), ("ttft_p50_ms", "TTFT p50 (ms)"),
                           ("ttft_p95_ms", "TTFT p95 (ms)"), ("decode_tokens_per_s_p50", "decode tokens/s, p50"),
                           ("e2e_p50_ms", "end-to-end p50 (ms)")]:
            o, p = table[level]["mlx-serving"][key], table[level]["mlx_lm.server"][key]
            print(f"  {level:<6}{label:<26}{fmt(o):>12}{fmt(p):>15}{fmt(ratio(o, p), 2) + 'x':>8}")
    top = levels[-1]
    headline = {
        f"aggregate_tokens_per_s_at_{top}": ratio(table[top]["mlx-serving"]["output_tokens_per_s"], table[top]["mlx_lm.server"]["output_tokens_per_s"]),
        f"ttft_p95_at_{top}": ratio(table[top]["mlx-serving"]["ttft_p95_ms"], table[top]["mlx_lm.server"]["ttft_p95_ms"]),
    }
    if 1 in table:
        headline["single_stream_decode_tokens_per_s"] = ratio(table[1]["mlx-serving"]["decode_tokens_per_s_p50"],
                                                              table[1]["mlx_lm.server"]["decode_tokens_per_s_p50"])
    print()
    print("ratios (mlx-serving / mlx_lm.server):")
    for k, v in headline.items():
        print(f"  {k:<40}{fmt(v, 2)}x")
    total_errors = sum(r["errors"] for r in runs)
    if total_errors:
        print(f"warning: {total_errors} requests failed; see the JSON reports")
    summary = {"machine": machine(), "settings": {k: v for k, v in vars(a).items()}, "levels": levels,
               "medians": {str(k): v for k, v in table.items()}, "ratios": headline, "runs": runs}
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary: {results / 'summary.json'}")


if __name__ == "__main__":
    main()
