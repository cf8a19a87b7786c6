#!/usr/bin/env python3
"""Benchmark-sized random-weight models in the shapes of Qwen3-0.6B and Llama-3-8B.

tests/fixtures/make_models.py makes the tiny test models (and its --large flag one 12-layer qwen3); it
has no flag for other shapes, so this script reuses its tokenizer (trained on the committed corpus), its
config writer and the steps of its build_model (`mlx_lm.convert --dtype bfloat16 [-q]`), with the real
vocabulary sizes and weights drawn on the default device (the GPU there) instead of through numpy,
which would take minutes for 8 B parameters.

    python benches/gpu/bench_models.py --out /tmp/models qwen3-0.6b-bf16 qwen3-0.6b-q4 llama3-8b-bf16
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))

import make_models as fx  # noqa: E402  (the fixture script; importing it runs nothing)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_lm.utils import get_total_parameters, quantize_model, save_config, save_model  # noqa: E402

# Public config.json shapes of Qwen/Qwen3-0.6B and meta-llama/Meta-Llama-3-8B.
SHAPES = {
    "qwen3-0.6b": dict(
        model_type="qwen3", hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1000000.0, rope_scaling=None, max_position_embeddings=40960,
        tie_word_embeddings=True, attention_bias=False, hidden_act="silu", vocab=151936),
    "llama3-8b": dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=None, rope_traditional=False, max_position_embeddings=8192,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu", vocab=128256),
    # Tiny stand-ins with the same code path, to test the benchmark on a CPU.
    "qwen3-tiny": dict(
        model_type="qwen3", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
        rope_theta=1000000.0, rope_scaling=None, max_position_embeddings=4096,
        tie_word_embeddings=True, attention_bias=False, hidden_act="silu", vocab=4096),
    "llama3-tiny": dict(
        model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=None, rope_traditional=False, max_position_embeddings=4096,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu", vocab=4096),
}
# name -> (shape, quantization (bits, group size) or None); 4-bit is mlx-community's q4 (group 64).
VARIANTS = {f"{s}-{q}": (s, None if q == "bf16" else (4, 64)) for s in SHAPES for q in ("bf16", "q4")}


def random_weights(model, std=0.02):
    """Normal(0, std) matrices, norms 1 + N(0, 0.1), drawn in bfloat16 on the default device."""
    new = []
    for i, (name, v) in enumerate(tree_flatten(model.parameters())):
        key = mx.random.key(fx.GLOBAL_SEED + i)
        if "norm" in name:
            w = 1.0 + 0.1 * mx.random.normal(v.shape, dtype=mx.float32, key=key)
        else:
            w = std * mx.random.normal(v.shape, dtype=mx.float32, key=key)
        new.append((name, w.astype(mx.bfloat16)))
        if i % 16 == 0:
            mx.eval([x for _, x in new[-16:]])
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())


def build(name: str, out: Path, tok) -> dict:
    shape, quant = VARIANTS[name]
    cfg_in = dict(SHAPES[shape])
    vocab = cfg_in.pop("vocab")
    fx.BASES[shape] = {"seed": 0, "config": cfg_in}
    config = fx.hf_config(shape, "bfloat16", {})
    config["vocab_size"] = vocab
    module = fx.ARCH_MODULES[config["model_type"]]
    t0 = time.time()
    model = module.Model(module.ModelArgs.from_dict(config))
    random_weights(model)
    if quant is not None:
        bits, group = quant
        model, config = quantize_model(model, config, group, bits, mode="affine")
    out.mkdir(parents=True, exist_ok=True)
    n_params = get_total_parameters(model)
    save_model(out, model)
    save_config(config, out / "config.json")
    fx.write_tokenizer(tok, out)
    size = sum(p.stat().st_size for p in out.iterdir())
    del model
    mx.clear_cache()
    secs = time.time() - t0
    print(f"[model] {name}: {n_params:,} params, {size / 1e9:.2f} GB on disk, {secs:.1f}s -> {out}", flush=True)
    return {"name": name, "params": n_params, "disk_bytes": size, "make_s": round(secs, 1), "path": str(out)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("names", nargs="+", choices=sorted(VARIANTS))
    a = ap.parse_args()
    tok = fx.train_tokenizer(fx.CORPUS.read_text(encoding="utf-8"))
    for n in a.names:
        build(n, Path(a.out) / n, tok)


if __name__ == "__main__":
    main()
