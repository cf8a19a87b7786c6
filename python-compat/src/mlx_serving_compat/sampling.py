"""Samplers and logits processors of one request, built from mlx-lm's sampling functions.

A sampled request owns its random key, so a seed gives the same tokens whatever else the worker
runs: each draw splits the key, as the Rust worker's sampler does, and a resumed request skips
the draws its earlier tokens took.
"""

import random
from typing import List

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler, make_repetition_penalty

from .errors import invalid
from .params import Sampling


def validate(s: Sampling) -> None:
    """Checks every field against its range; the error names the field and the range."""
    if not (s.temperature >= 0 and s.temperature != float("inf")):
        raise invalid(f"`temperature` must be a finite number >= 0, got {s.temperature}")
    if not 0.0 < s.top_p <= 1.0:
        raise invalid(f"`top_p` must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise invalid(f"`top_k` must be >= 0, got {s.top_k}")
    if not 0.0 <= s.min_p <= 1.0:
        raise invalid(f"`min_p` must be in [0, 1], got {s.min_p}")
    if not (0 < s.repetition_penalty < float("inf")):
        raise invalid(f"`repetition_penalty` must be a finite number > 0, got {s.repetition_penalty}")


class KeyedSampler:
    """Top-p, min-p and top-k filters, then a categorical draw at the temperature, with a key
    of its own. Takes log-probabilities `[1, vocab]`, returns `[1]` token ids."""

    def __init__(self, s: Sampling):
        self._s = s
        seed = s.seed if s.seed is not None else random.getrandbits(64)
        self._key = mx.random.key(seed)

    def advance(self, n: int) -> None:
        for _ in range(n):
            self._key = mx.random.split(self._key)[0]

    def __call__(self, logprobs: mx.array) -> mx.array:
        s = self._s
        keys = mx.random.split(self._key)
        self._key, sub = keys[0], keys[1]
        if s.top_p < 1.0:
            logprobs = apply_top_p(logprobs, s.top_p)
        if s.min_p > 0.0:
            logprobs = apply_min_p(logprobs, s.min_p)
        if 0 < s.top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, s.top_k)
        return mx.random.categorical(logprobs * (1.0 / s.temperature), key=sub)


def make_sampler(s: Sampling, resumed: int):
    """The sampler of a request; greedy requests share one function, so a batch of them samples
    in one call."""
    validate(s)
    if s.temperature == 0:
        return greedy_sampler
    sampler = KeyedSampler(s)
    sampler.advance(resumed)
    return sampler


def make_processors(s: Sampling) -> List:
    if s.repetition_penalty == 1.0 or s.repetition_context_size == 0:
        return []
    return [make_repetition_penalty(s.repetition_penalty, s.repetition_context_size)]
