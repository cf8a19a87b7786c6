"""Decode speed of `mlx-serving generate` against `mlx_lm generate`, side by side.

Runs the two commands alternately on the same model, prompt and token budget, and prints the
median decode tokens/s of each and their ratio. Both use greedy sampling and the model's chat
template, so they see the same prompt tokens and produce the same tokens.

    python benches/decode.py --model tests/fixtures/models/qwen3-bf16 --runs 5
"""
import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OURS = re.compile(r"prompt: (\d+) tokens, time to first token ([\d.]+) s; generation: (\d+) tokens, ([\d.]+) tokens/s")
THEIRS_PROMPT = re.compile(r"Prompt: (\d+) tokens, ([\d.]+) tokens-per-sec")
THEIRS_GEN = re.compile(r"Generation: (\d+) tokens, ([\d.]+) tokens-per-sec")


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return p.stdout + p.stderr


def ours(binary, a):
    out = run([binary, "generate", "--model", a.model, "--chat", "--prompt", a.prompt,
               "--max-tokens", str(a.max_tokens)])
    m = OURS.search(out)
    if not m:
        sys.exit(f"unexpected output from mlx-serving:\n{out[-2000:]}")
    return {"prompt": int(m[1]), "tokens": int(m[3]), "tps": float(m[4])}


def theirs(a):
    out = run([a.python, "-m", "mlx_lm", "generate", "--model", a.model, "--prompt", a.prompt,
               "--max-tokens", str(a.max_tokens), "--temp", "0"])
    p, g = THEIRS_PROMPT.search(out), THEIRS_GEN.search(out)
    if not (p and g):
        sys.exit(f"unexpected output from mlx_lm:\n{out[-2000:]}")
    return {"prompt": int(p[1]), "tokens": int(g[1]), "tps": float(g[2])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", default="Tell me about the license and what it allows.")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--python", default=sys.executable, help="python with mlx-lm installed")
    ap.add_argument("--binary", default=str(ROOT / "target/release/mlx-serving"))
    a = ap.parse_args()

    rows = {"mlx-serving": [], "mlx_lm": []}
    for i in range(a.runs):
        # Alternate which goes first, so drift on a shared machine falls on both.
        order = [("mlx-serving", lambda: ours(a.binary, a)), ("mlx_lm", lambda: theirs(a))]
        for name, fn in order if i % 2 == 0 else reversed(order):
            r = fn()
            rows[name].append(r)
            print(f"run {i + 1} {name:12s} prompt {r['prompt']:4d} tokens, {r['tokens']:4d} generated, "
                  f"{r['tps']:8.1f} tokens/s", flush=True)

    med = {k: statistics.median(r["tps"] for r in v) for k, v in rows.items()}
    counts = {k: {(r["prompt"], r["tokens"]) for r in v} for k, v in rows.items()}
    print(f"model {a.model}")
    print(f"median decode tokens/s: mlx-serving {med['mlx-serving']:.1f}, mlx_lm {med['mlx_lm']:.1f}, "
          f"ratio {med['mlx-serving'] / med['mlx_lm']:.2f}x")
    if counts["mlx-serving"] != counts["mlx_lm"]:
        print(f"warning: prompt/generated token counts differ: {counts}")


if __name__ == "__main__":
    main()
