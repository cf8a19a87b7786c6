"""How the sequences of one model advance: continuous batching with mlx-lm's BatchGenerator, or
one sequence at a time with `generate_step` for models whose caches cannot be batched.

Both take requests (`prompt`, `remaining`, `sampler`, `processors`), and each `step()` returns
the prompt tokens prefilled and the `(request, token, logprobs)` produced in that step.
"""

from collections import deque

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, generate_step


class BatchBackend:
    def __init__(self, model, max_sequences: int, prefill_chunk: int):
        self._gen = BatchGenerator(
            model,
            completion_batch_size=max_sequences,
            prefill_batch_size=min(8, max_sequences),
            prefill_step_size=prefill_chunk,
        )
        self._by_uid = {}

    def add(self, req) -> None:
        (uid,) = self._gen.insert(
            [req.prompt], max_tokens=[req.remaining], samplers=[req.sampler], logits_processors=[req.processors]
        )
        req.uid = uid
        req.prefill_progress = 0
        self._by_uid[uid] = req

    def remove(self, req) -> None:
        if self._by_uid.pop(getattr(req, "uid", None), None) is not None:
            self._gen.remove([req.uid])

    def busy(self) -> bool:
        return bool(self._by_uid)

    def step(self):
        prompt_responses, generated = self._gen.next()
        prefilled = 0
        for r in prompt_responses:
            req = self._by_uid.get(r.uid)
            if req is not None:
                done = r.progress[0]
                prefilled += max(0, done - req.prefill_progress)
                req.prefill_progress = done
        tokens = []
        for r in generated:
            req = self._by_uid.get(r.uid)
            if req is None:
                continue
            tokens.append((req, r.token, r.logprobs))
            if r.finish_reason is not None:
                # The generator has let it go (it reached `remaining`).
                del self._by_uid[r.uid]
        return prefilled, tokens


class SequentialBackend:
    def __init__(self, model, max_sequences: int, prefill_chunk: int):
        self._model = model
        self._prefill_chunk = prefill_chunk
        self._waiting = deque()
        self._current = None
        self._steps = None
        self._prefilled = 0

    def add(self, req) -> None:
        self._waiting.append(req)

    def remove(self, req) -> None:
        if req is self._current:
            self._current, self._steps = None, None
        elif req in self._waiting:
            self._waiting.remove(req)

    def busy(self) -> bool:
        return self._current is not None or bool(self._waiting)

    def _progress(self, done: int, total: int) -> None:
        self._prefilled += max(0, done - self._current.prefill_progress)
        self._current.prefill_progress = done

    def step(self):
        self._prefilled = 0
        if self._current is None:
            if not self._waiting:
                return 0, []
            req = self._current = self._waiting.popleft()
            req.prefill_progress = 0
            self._steps = generate_step(
                mx.array(req.prompt),
                self._model,
                max_tokens=req.remaining,
                sampler=req.sampler,
                logits_processors=req.processors,
                prefill_step_size=self._prefill_chunk,
                prompt_progress_callback=self._progress,
            )
        req = self._current
        try:
            token, logprobs = next(self._steps)
        except StopIteration:
            self._current, self._steps = None, None
            return self._prefilled, []
        return self._prefilled, [(req, int(token), logprobs)]
