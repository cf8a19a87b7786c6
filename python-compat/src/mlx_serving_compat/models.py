"""A model loaded with mlx-lm, and what the protocol reports about it."""

import json
import os
from typing import List

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load

from .errors import MODEL_LOAD_FAILED, RpcError

# Where config.json names no context length.
DEFAULT_CONTEXT_LENGTH = 4096


class LoadedModel:
    def __init__(self, name: str, path: str):
        if not os.path.isdir(path):
            raise RpcError(MODEL_LOAD_FAILED, f"loading `{name}` from {path}: no such directory")
        try:
            with open(os.path.join(path, "config.json")) as f:
                self.config = json.load(f)
            self.model, self.tokenizer = load(path)
        except Exception as e:  # any failure of a model directory is the caller's to see
            raise RpcError(MODEL_LOAD_FAILED, f"loading `{name}` from {path}: {type(e).__name__}: {e}") from e
        self.name = name
        self.path = path
        self.model_type = self.config.get("model_type", "")
        self.eos_ids = set(int(t) for t in self.tokenizer.eos_token_ids)
        self.vocab_size = len(self.tokenizer._tokenizer)
        self.model_vocab_size = int(self.config.get("vocab_size") or self.vocab_size)
        self.context_length = int(self.config.get("max_position_embeddings") or DEFAULT_CONTEXT_LENGTH)
        self.weight_bytes = sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))
        self.kv_bytes_per_token = self._kv_bytes_per_token()
        # BatchGenerator merges per-sequence caches; a cache type that cannot merge (a recurrent
        # state, for one) means sequences run one at a time.
        self.batchable = all(hasattr(c, "merge") for c in make_prompt_cache(self.model))

    def _kv_bytes_per_token(self) -> int:
        c = self.config
        layers = int(c.get("num_hidden_layers") or len(getattr(self.model, "layers", [])))
        heads = int(c.get("num_attention_heads") or 1)
        kv_heads = int(c.get("num_key_value_heads") or heads)
        head_dim = int(c.get("head_dim") or int(c.get("hidden_size", 0)) // heads)
        dtype = next((v.dtype for _, v in tree_flatten(self.model.parameters()) if mx.issubdtype(v.dtype, mx.floating)), mx.float32)
        return 2 * layers * kv_heads * head_dim * dtype.size

    def encode_text(self, text: str) -> List[int]:
        return list(self.tokenizer.encode(text))

    def encode_chat(self, messages) -> List[int]:
        rendered = [{"role": m.role, "content": m.content} for m in messages]
        return list(self.tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=True))

    def decode(self, ids: List[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def info(self, kv_cache_bytes: int) -> dict:
        return {
            "model": self.name,
            "path": self.path,
            "model_type": self.model_type,
            "weight_bytes": self.weight_bytes,
            "kv_cache_bytes": kv_cache_bytes,
            "context_length": self.context_length,
            "kv_bytes_per_token": self.kv_bytes_per_token,
        }
