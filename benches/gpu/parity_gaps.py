"""Where greedy tokens on the GPU part from the CPU's: how close the CPU's top two logits were there.

Reads the parity rows of a bench.py results file (each fixture model and prompt: the greedy
tokens of our worker and of mlx-lm on the GPU, and the CPU golden) and, on this machine's CPU,
runs mlx-lm's model over each case's prompt again. For every step it takes the gap between the
top two log-probabilities (greedy decoding takes the larger), in units of the bfloat16 spacing at
the top one (ulps: a bfloat16 number has 8 significant bits, so one ulp is 1/128 to 1/256 of the
value). It prints the gap at each case's
first differing token and the spread of gaps over every step compared.

`--emulate` also decodes each case on the CPU with attention, rotary embedding and RMS norm
computed in float32 with one rounding at the end, as MLX's fused GPU kernels compute them (the
CPU runs unfused versions that round some intermediate results to the model's type), and counts
how many cases then equal the GPU's tokens.

    .venv-bench/bin/python benches/gpu/parity_gaps.py benches/gpu/results-2026-12-04/bf16agg-results.json
"""
import argparse
import functools
import json
import math
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx_lm.models.cache import make_prompt_cache

ROOT = Path(__file__).resolve().parents[2]
FAST = {k: getattr(mx.fast, k) for k in ("rms_norm", "rope", "scaled_dot_product_attention")}


@functools.cache
def fixture(name):
    """A fixture model, loaded once, and its golden cases by name."""
    model = mlx_lm.load(str(ROOT / "tests/fixtures/models" / name))[0]
    cases = json.loads((ROOT / f"tests/fixtures/golden/{name}.json").read_text())["cases"]
    return model, {c["name"]: c for c in cases}


def replay(row, n):
    """`greedy` over the prompt of a parity row's case, on this machine."""
    model, cases = fixture(row["model"])
    return greedy(model, cases[row["case"]]["prompt_ids"], n)


def ulp(x):
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 2.0 ** -133


def greedy(model, prompt, n):
    """The first `n` greedy tokens and, at each, the gap between the top two log-probabilities in
    ulps. As mlx-lm's `generate_step` (and our worker) does, the token is the largest
    log-probability, computed in the model's type."""
    cache = make_prompt_cache(model)
    x = mx.array(prompt)[None]
    tokens, gaps = [], []
    for _ in range(n):
        logits = model(x, cache=cache)[0, -1]
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        hi, lo = sorted(mx.topk(logprobs.astype(mx.float32), 2).tolist(), reverse=True)
        t = int(mx.argmax(logprobs).item())
        tokens.append(t)
        gaps.append((hi - lo) / ulp(hi))
        x = mx.array([[t]])
    return tokens, gaps


def attention_f32(q, k, v, *, scale, mask=None, sinks=None, **_):
    q32, k32, v32 = (a.astype(mx.float32) for a in (q, k, v))
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k32, v32 = mx.repeat(k32, rep, axis=1), mx.repeat(v32, rep, axis=1)
    s = (q32 * scale) @ k32.swapaxes(-1, -2)
    if isinstance(mask, str):  # "causal": the last L of S positions
        L, S = q.shape[2], k.shape[2]
        s = mx.where(mx.arange(S)[None] <= mx.arange(S - L, S)[:, None], s, -mx.inf)
    elif mask is not None:
        s = mx.where(mask, s, -mx.inf) if mask.dtype == mx.bool_ else s + mask.astype(mx.float32)
    return (mx.softmax(s, axis=-1) @ v32).astype(q.dtype)


def rope_f32(x, dims, **kw):
    return FAST["rope"](x.astype(mx.float32), dims, **kw).astype(x.dtype)


def rms_norm_f32(x, w, eps):
    x32 = x.astype(mx.float32)
    y = (x32 * mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return y * w if w is not None else y


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", help="a bench.py results.json with parity rows")
    ap.add_argument("--emulate", action="store_true", help="also decode with float32 fused-kernel arithmetic")
    a = ap.parse_args()
    rows = json.loads(Path(a.results).read_text())["parity"]
    all_gaps, at_diff = [], []
    for r in rows:
        if r["ours_first_diff"] is None:
            continue
        tokens, gaps = replay(r, len(r["golden"]))
        d = r["ours_first_diff"]
        all_gaps += gaps[:d + 1]
        at_diff.append(gaps[d])
        print(f"{r['model']}/{r['case']}: GPU parts at token {d} ({r['ours'][d]} for the CPU's {r['golden'][d]}); "
              f"top-two gap there {gaps[d]:.0f} ulp, smallest before it {min(gaps[:d], default=float('nan')):.0f}"
              + ("" if tokens == r["golden"] else "  (this CPU's run differs from the golden)"))
    all_gaps.sort()
    q = lambda f: all_gaps[int(f * (len(all_gaps) - 1))]
    print(f"gaps at the {len(at_diff)} first differences (ulp): {sorted(round(g) for g in at_diff)}")
    print(f"gaps over all {len(all_gaps)} steps up to them (ulp): 5% {q(0.05):.0f}, 25% {q(0.25):.0f}, median {q(0.5):.0f}")
    if a.emulate:
        for name, patch in (("as the CPU computes", {}),
                            ("float32 attention, rope and norms", {"scaled_dot_product_attention": attention_f32,
                                                                   "rope": rope_f32, "rms_norm": rms_norm_f32})):
            for k, f in FAST.items():
                setattr(mx.fast, k, patch.get(k, f))
            equal = sum(replay(r, len(r["ours"]))[0] == r["ours"] for r in rows)
            print(f"CPU decoding {name}: equal to the GPU's tokens in {equal} of {len(rows)} cases")
        for k, f in FAST.items():
            setattr(mx.fast, k, f)


if __name__ == "__main__":
    main()
