#!/usr/bin/env python3
"""Trains the bundled demo model: a small llama on the King James Bible (public domain).

Three steps, each one command:

  corpus   (here)  the text of Debian's bible-kjv package, one verse per line:
                   python3 scripts/train_demo_model.py corpus /tmp/demo/kjv.txt
  train    (GPU)   a byte-level BPE tokenizer and the model, written in the Hugging Face llama
                   layout in bfloat16, in shards of at most 15 MB:
                   python3 scripts/train_demo_model.py train /tmp/demo/kjv.txt OUT_DIR
  convert  (here)  MLX 4-bit affine quantization (group 64), the mlx-community layout, with
                   mlx-lm's own converter:
                   python3 scripts/train_demo_model.py convert OUT_DIR models/demo

Pinned: torch 2.11.0, tokenizers 0.23.2, safetensors 0.8.0 for `train`; mlx 0.32.4 and
mlx-lm 0.32.2 for `convert`. Seeds are fixed; on the same GPU and versions the run repeats.

The training text mixes plain verse runs with a chat form (a verse as the user's turn, the verses
after it as the assistant's), so the chat template below is something the model has seen.
"""
import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

SEED = 20261202
VOCAB = 4096
SPECIAL = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# The model: about 20 M parameters, 4-bit under 15 MB.
SHAPE = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=1536, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5)
SEQ = 256
# The text is small for the model: it overfits within a few epochs, so dropout is high, the
# run short, and the weights kept are those of the best validation loss (checked every 100 steps).
DROPOUT = 0.2
PEAK_LR = 6e-4


def corpus(out: Path):
    """One verse per line, the book/chapter/verse reference removed."""
    text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    verses = []
    for line in text.splitlines():
        m = re.match(r"^\S+?\d+:\d+ (.*)$", line)
        if m:
            verses.append(m.group(1).strip())
        elif line.strip() and verses:  # a verse wrapped onto the next line
            verses[-1] += " " + line.strip()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(verses) + "\n", encoding="utf-8")
    print(f"{len(verses)} verses, {out.stat().st_size / 1e6:.2f} MB -> {out}")


def documents(verses, rng):
    """Training documents: runs of 4-12 verses, and chat exchanges (one verse, then 1-3 more)."""
    docs = []
    i = 0
    while i < len(verses):
        n = rng.randint(4, 12)
        docs.append(" ".join(verses[i:i + n]) + "<|endoftext|>")
        i += n
    for i in range(0, len(verses) - 4, 2):
        k = rng.randint(1, 3)
        docs.append(f"<|user|>\n{verses[i]}<|end|>\n<|assistant|>\n{' '.join(verses[i + 1:i + 1 + k])}<|end|>\n<|endoftext|>")
    rng.shuffle(docs)
    return docs


def train_tokenizer(verses, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(verses, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": SHAPE["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    return tok


def train(corpus_path: Path, out: Path, minutes: float):
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from safetensors.torch import save_file

    random.seed(SEED)
    np.random.seed(SEED % 2**32)
    torch.manual_seed(SEED)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out.mkdir(parents=True, exist_ok=True)
    verses = corpus_path.read_text(encoding="utf-8").splitlines()
    # Every 20th block of 50 verses is held out for validation.
    train_v = [v for i, v in enumerate(verses) if (i // 50) % 20 != 7]
    val_v = [v for i, v in enumerate(verses) if (i // 50) % 20 == 7]
    tok = train_tokenizer(train_v, out)
    rng = random.Random(SEED)

    def encode(docs):
        ids = []
        for enc in tok.encode_batch(docs):
            ids.extend(enc.ids)
        return np.array(ids, dtype=np.int64)

    train_ids = torch.from_numpy(encode(documents(train_v, rng)))
    val_ids = torch.from_numpy(encode([" ".join(val_v[i:i + 8]) + "<|endoftext|>" for i in range(0, len(val_v), 8)]))
    counts = np.bincount(train_ids.numpy(), minlength=VOCAB).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())
    print(f"tokens: train {len(train_ids)}, validation {len(val_ids)}; unigram entropy {unigram_entropy:.3f} nats/token",
          flush=True)

    h, nh, nkv = SHAPE["hidden_size"], SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"]
    hd = h // nh

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(h))

        def forward(self, x):
            x32 = x.float()
            return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + SHAPE["rms_norm_eps"])).type_as(x) * self.weight

    inv = 1.0 / (SHAPE["rope_theta"] ** (torch.arange(0, hd, 2, device=dev).float() / hd))
    pos = torch.arange(SEQ, device=dev).float()
    freqs = torch.outer(pos, inv)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rope(x):  # x: [B, heads, T, hd]; the rotate-half layout of the Hugging Face llama
        t = x.shape[2]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos[:t] + torch.cat([-x2, x1], -1) * sin[:t]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = RMSNorm()
            self.post_attention_layernorm = RMSNorm()
            self.q_proj = nn.Linear(h, nh * hd, bias=False)
            self.k_proj = nn.Linear(h, nkv * hd, bias=False)
            self.v_proj = nn.Linear(h, nkv * hd, bias=False)
            self.o_proj = nn.Linear(nh * hd, h, bias=False)
            self.gate_proj = nn.Linear(h, SHAPE["intermediate_size"], bias=False)
            self.up_proj = nn.Linear(h, SHAPE["intermediate_size"], bias=False)
            self.down_proj = nn.Linear(SHAPE["intermediate_size"], h, bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            y = self.input_layernorm(x)
            q = rope(self.q_proj(y).view(b, t, nh, hd).transpose(1, 2))
            k = rope(self.k_proj(y).view(b, t, nkv, hd).transpose(1, 2))
            v = self.v_proj(y).view(b, t, nkv, hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, dropout_p=DROPOUT if self.training else 0.0)
            x = x + F.dropout(self.o_proj(a.transpose(1, 2).reshape(b, t, h)), DROPOUT, self.training)
            y = self.post_attention_layernorm(x)
            return x + F.dropout(self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y)), DROPOUT, self.training)

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(VOCAB, h)
            self.layers = nn.ModuleList([Block() for _ in range(SHAPE["num_hidden_layers"])])
            self.norm = RMSNorm()
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)

        def forward(self, ids):
            x = self.embed_tokens(ids)
            for layer in self.layers:
                x = layer(x)
            return self.norm(x) @ self.embed_tokens.weight.T  # tied embeddings

    model = Llama().to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f} M", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=PEAK_LR, betas=(0.9, 0.95), fused=dev == "cuda")
    batch = 64
    gen = torch.Generator().manual_seed(SEED)

    def sample(ids):
        starts = torch.randint(0, len(ids) - SEQ - 1, (batch,), generator=gen)
        x = torch.stack([ids[s:s + SEQ] for s in starts])
        y = torch.stack([ids[s + 1:s + SEQ + 1] for s in starts])
        return x.to(dev), y.to(dev)

    @torch.no_grad()
    def evaluate(ids):
        model.eval()
        losses = []
        for s in range(0, len(ids) - SEQ - 1, SEQ * 8):
            chunk = torch.stack([ids[s + j * SEQ: s + j * SEQ + SEQ + 1] for j in range(8) if s + j * SEQ + SEQ + 1 <= len(ids)])
            chunk = chunk.to(dev)
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                logits = model(chunk[:, :-1])
            losses.append(F.cross_entropy(logits.float().reshape(-1, VOCAB), chunk[:, 1:].reshape(-1)).item())
        model.train()
        return sum(losses) / len(losses)

    steps = int(os.environ.get("DEMO_STEPS", "2500"))
    warmup = 200
    t0 = time.time()
    best = (math.inf, None, 0)
    model.train()
    for step in range(1, steps + 1):
        lr = PEAK_LR * min(1.0, step / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps))))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = sample(train_ids)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps:
            val = evaluate(val_ids)
            print(f"step {step}: train loss {loss.item():.3f}, validation loss {val:.3f}, lr {lr:.2e}, "
                  f"{time.time() - t0:.0f} s", flush=True)
            if val < best[0]:
                best = (val, {k: v.detach().to("cpu", torch.bfloat16).clone() for k, v in model.state_dict().items()}, step)
        if time.time() - t0 > minutes * 60:
            print(f"stopping at the time limit ({minutes} min), step {step}", flush=True)
            break
    model.load_state_dict({k: v.float() for k, v in best[1].items()})
    final_train = evaluate(train_ids[: len(val_ids) * 4])
    print(f"best validation loss {best[0]:.3f} at step {best[2]}; training loss there {final_train:.3f}; "
          f"unigram entropy {unigram_entropy:.3f}", flush=True)

    # The Hugging Face llama layout: model.* names, [out, in] weights, bfloat16, tied embeddings.
    tensors = {"model.embed_tokens.weight": best[1]["embed_tokens.weight"], "model.norm.weight": best[1]["norm.weight"]}
    for i in range(SHAPE["num_hidden_layers"]):
        for name in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{name}.weight"] = best[1][f"layers.{i}.{name}.weight"]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"model.layers.{i}.self_attn.{name}.weight"] = best[1][f"layers.{i}.{name}.weight"]
        for name in ("gate_proj", "up_proj", "down_proj"):
            tensors[f"model.layers.{i}.mlp.{name}.weight"] = best[1][f"layers.{i}.{name}.weight"]
    shards, current, size = [], {}, 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * 2
        if current and size + nbytes > 15_000_000:
            shards.append(current)
            current, size = {}, 0
        current[k] = tensors[k].contiguous()
        size += nbytes
    shards.append(current)
    for i, shard in enumerate(shards):
        save_file(shard, str(out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
        "hidden_act": "silu", "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "bfloat16", "bos_token_id": None, "eos_token_id": tok.token_to_id("<|end|>"),
        "pad_token_id": tok.token_to_id("<|endoftext|>"), "head_dim": hd, **SHAPE,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps({
        "seed": SEED, "parameters": n_params, "train_tokens": len(train_ids), "validation_tokens": len(val_ids),
        "best_step": best[2], "validation_loss": round(best[0], 4), "training_loss": round(final_train, 4),
        "unigram_entropy": round(unigram_entropy, 4), "seconds": round(time.time() - t0, 1),
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
    }, indent=2) + "\n")
    print(f"wrote {out}", flush=True)


def convert(src: Path, dst: Path):
    from mlx_lm import convert as mlx_convert
    if dst.exists():
        sys.exit(f"{dst} exists: remove it first")
    mlx_convert(str(src), mlx_path=str(dst), quantize=True, q_group_size=64, q_bits=4)
    # mlx-lm writes its own tokenizer files through transformers; keep ours, byte for byte.
    for name in ("tokenizer.json", "tokenizer_config.json", "training.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    total = sum(f.stat().st_size for f in dst.iterdir())
    print(f"{dst}: {total / 1e6:.2f} MB")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("out", type=Path)
    t = sub.add_parser("train")
    t.add_argument("corpus", type=Path)
    t.add_argument("out", type=Path)
    t.add_argument("--minutes", type=float, default=6.0, help="stop training after this long")
    v = sub.add_parser("convert")
    v.add_argument("src", type=Path)
    v.add_argument("dst", type=Path)
    a = ap.parse_args()
    if a.cmd == "corpus":
        corpus(a.out)
    elif a.cmd == "train":
        train(a.corpus, a.out, a.minutes)
    else:
        convert(a.src, a.dst)


if __name__ == "__main__":
    main()
