"""The engine thread: the one thread that calls MLX.

Every method becomes a command on the engine's queue, with a reply callback that writes the
response. Each turn of the loop takes the commands that arrived, admits queued requests while
the sequence limit and the KV-cache budget allow, advances every model with work by one step
(a prefill chunk and one decode step for its running sequences), turns tokens into events and
ends the requests that are done.
"""

import itertools
import logging
import os
import queue
import resource
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import mlx.core as mx

from . import errors
from .backends import BatchBackend, SequentialBackend
from .errors import RpcError, invalid
from .models import LoadedModel
from .params import GenerateRequest
from .sampling import make_processors, make_sampler
from .text import TextStream, check_stop_strings

log = logging.getLogger("mlx_serving_compat")

MAX_TOP_LOGPROBS = 20


# The figures of a prefix cache, for a worker without one.
NO_PREFIX_CACHE = {"hits": 0, "misses": 0, "cached_tokens": 0, "evictions": 0, "entries": 0, "bytes": 0}


@dataclass
class Limits:
    max_sequences: int = 32
    max_queue: int = 256
    kv_cache_bytes: int = 2 << 30
    max_line_bytes: int = 4 << 20
    prefill_chunk: int = 512
    # This worker keeps no prefix cache: the bytes it may hold are 0.
    prefix_cache_bytes: int = 0

    def to_json(self) -> dict:
        return dict(self.__dict__)


class Shared:
    """Figures the engine publishes after each step, read by the heartbeat thread."""

    def __init__(self):
        self.started = time.monotonic()
        self.prefilled_tokens = 0
        self.decoded_tokens = 0
        self.steps = 0
        self.queue_depth = 0
        self.active_sequences = 0
        self.models: List[str] = []
        self.memory = {"active": 0, "peak": 0, "cache": 0}
        self.draining = False

    def uptime_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    def progress(self) -> dict:
        return {"prefilled_tokens": self.prefilled_tokens, "decoded_tokens": self.decoded_tokens, "steps": self.steps}


@dataclass
class Request:
    key: int
    id: str
    model: str
    prompt: List[int]
    prompt_tokens: int
    max_tokens: int
    resumed: int
    sampler: Callable
    processors: List
    text: TextStream
    stop_token_ids: set
    ignore_eos: bool
    logprobs: bool
    top_logprobs: int
    emit: Callable[[dict], None]
    arrived: float
    reserve: int
    generated: int = 0
    first_token: Optional[float] = None
    done: Optional[tuple] = None
    subscription: int = 0
    uid: int = -1
    prefill_progress: int = 0

    @property
    def remaining(self) -> int:
        return max(1, self.max_tokens - self.resumed)

    def end(self, reason: str, error: Optional[dict] = None) -> None:
        if self.done is None:
            self.done = (reason, error)


class Engine:
    def __init__(self, limits: Limits, shared: Shared, batching: bool = True, max_context_tokens: int = 0):
        self.limits = limits
        # Context of every model when below its own (0: each model's own).
        self.max_context_tokens = max_context_tokens
        self.shared = shared
        self.batching = batching
        self.commands: "queue.Queue" = queue.Queue()
        self.models: Dict[str, LoadedModel] = {}
        self.backends: Dict[str, object] = {}
        self.waiting: deque = deque()
        self.running: List[Request] = []
        self.kv_reserved = 0
        self.keys = itertools.count(1)
        self.deadline: Optional[float] = None
        self.counts = dict(accepted=0, rejected=0, stopped=0, length=0, cancelled=0, failed=0)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # ---- called from other threads -------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def submit(self, method: str, reply: Callable, /, **args) -> None:
        """Queues a command; `reply(result, error)` runs on the engine thread."""
        self.commands.put((method, args, reply))

    # ---- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                if self._idle():
                    if self.deadline is not None:
                        break
                    self._handle(self.commands.get())
                while True:
                    try:
                        self._handle(self.commands.get_nowait())
                    except queue.Empty:
                        break
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self._cancel_all()
                self._sweep()
                self._admit()
                self._step()
                self._sweep()
                self._publish()
                if self.deadline is not None and self._idle():
                    break
            self._cancel_all()
            self._sweep()
            self._publish()
        except Exception:
            log.exception("the engine loop failed")
        finally:
            self.stopped.set()

    def _idle(self) -> bool:
        return not self.waiting and not self.running

    def _handle(self, command) -> None:
        method, args, reply = command
        try:
            result = getattr(self, "_do_" + method)(**args)
        except RpcError as e:
            if method == "generate":
                self.counts["rejected"] += 1
            reply(None, e)
        except Exception as e:
            log.exception("%s failed", method)
            reply(None, RpcError(errors.ENGINE_FAILURE, f"{method} failed: {type(e).__name__}: {e}"))
        else:
            reply(result, None)

    # ---- commands ------------------------------------------------------------------------

    def _do_load_model(self, model: str, path: str) -> dict:
        if self.deadline is not None:
            raise RpcError(errors.SHUTTING_DOWN, "the worker is shutting down")
        if not model:
            raise invalid("`model` must not be empty")
        loaded = self.models.get(model)
        if loaded is not None:
            if loaded.path == path:
                return self._info(loaded)
            raise invalid(f"model `{model}` is already loaded from {loaded.path}; unload it first")
        loaded = LoadedModel(model, path)
        if self.max_context_tokens > 0:
            loaded.context_length = min(loaded.context_length, self.max_context_tokens)
        batching = self.batching and loaded.batchable
        backend = BatchBackend if batching else SequentialBackend
        self.backends[model] = backend(loaded.model, self.limits.max_sequences, self.limits.prefill_chunk)
        self.models[model] = loaded
        log.info("model `%s` loaded from %s (%d weight bytes, %s)", model, path, loaded.weight_bytes,
                 "continuous batching" if batching else "one sequence at a time")
        self._publish_models()
        return self._info(loaded)

    def _do_unload_model(self, model: str) -> dict:
        if model not in self.models:
            raise self._not_loaded(model)
        cancelled = 0
        for r in itertools.chain(self.waiting, self.running):
            if r.model == model:
                r.end("cancelled")
                cancelled += 1
        self._sweep()
        del self.models[model]
        del self.backends[model]
        self._publish_models()
        mx.clear_cache()
        return {"model": model, "cancelled_requests": cancelled}

    def _do_list_models(self) -> list:
        return [self._info(m) for m in self.models.values()]

    def _do_generate(self, request: GenerateRequest, subscription: int, emit: Callable) -> int:
        r = self._admit_request(request, emit)
        r.subscription = subscription
        self.waiting.append(r)
        self.counts["accepted"] += 1
        return subscription

    def _do_cancel(self, id: str) -> bool:
        found = False
        for r in itertools.chain(self.waiting, self.running):
            if r.id == id:
                r.end("cancelled")
                found = True
        self._sweep()
        return found

    def _do_unsubscribe(self, subscription: int) -> bool:
        for r in itertools.chain(self.waiting, self.running):
            if r.subscription == subscription and r.done is None:
                # The caller has gone: nothing more is sent for this stream.
                r.emit = lambda event: None
                r.end("cancelled")
                return True
        return False

    def _do_stats(self) -> dict:
        self._publish()
        return {
            "uptime_ms": self.shared.uptime_ms(),
            "progress": self.shared.progress(),
            "queue_depth": len(self.waiting),
            "active_sequences": len(self.running),
            "requests": dict(self.counts),
            "models": self._do_list_models(),
            "memory": memory(self.shared),
            "kv_reserved_bytes": self.kv_reserved,
            "limits": self.limits.to_json(),
            "draining": self.deadline is not None,
            "prefix_cache": NO_PREFIX_CACHE,
        }

    def _do_shutdown(self, deadline_ms: int) -> dict:
        now = time.monotonic()
        deadline = now + deadline_ms / 1000.0
        self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)
        self.shared.draining = True
        return {
            "in_flight": len(self.waiting) + len(self.running),
            "deadline_ms": int(max(0.0, self.deadline - now) * 1000),
        }

    # ---- admission -----------------------------------------------------------------------

    def _not_loaded(self, name: str) -> RpcError:
        loaded = ", ".join(f'"{m}"' for m in self.models)
        return RpcError(errors.MODEL_NOT_LOADED, f"model `{name}` is not loaded (loaded: [{loaded}])")

    def _admit_request(self, req: GenerateRequest, emit: Callable) -> Request:
        """Validates a request; the error names what is wrong."""
        if self.deadline is not None:
            raise RpcError(errors.SHUTTING_DOWN, "the worker is shutting down")
        m = self.models.get(req.model)
        if m is None:
            raise self._not_loaded(req.model)
        if any(r.id == req.id for r in itertools.chain(self.waiting, self.running)):
            raise invalid(f"request id `{req.id}` is already in use")
        p = req.prompt
        if p.text is not None:
            prompt = m.encode_text(p.text)
        elif p.token_ids is not None:
            prompt = list(p.token_ids)
        else:
            try:
                prompt = m.encode_chat(p.messages)
            except Exception as e:
                raise invalid(f"rendering the chat template: {e}") from e
        if req.max_tokens == 0:
            raise invalid("`max_tokens` must be at least 1")
        resumed = len(req.resume_tokens)
        if resumed > req.max_tokens:
            raise invalid(f"`resume_tokens` ({resumed}) must not exceed `max_tokens` ({req.max_tokens})")
        prompt_tokens = len(prompt)
        if prompt_tokens == 0:
            raise invalid("the prompt is empty")
        prompt += req.resume_tokens
        remaining = max(1, req.max_tokens - resumed)
        ctx = m.context_length
        if len(prompt) >= ctx:
            raise invalid(f"the prompt has {len(prompt)} tokens, which does not fit the model's context of {ctx} tokens")
        if len(prompt) + remaining > ctx:
            raise invalid(
                f"prompt ({len(prompt)} tokens) plus `max_tokens` ({remaining}) exceeds the model's context of {ctx} tokens"
            )
        sampler = make_sampler(req.sampling, resumed)
        if req.top_logprobs > MAX_TOP_LOGPROBS:
            raise invalid(f"`top_logprobs` must be at most {MAX_TOP_LOGPROBS}, got {req.top_logprobs}")
        reserve = (len(prompt) + remaining) * m.kv_bytes_per_token
        if reserve > self.limits.kv_cache_bytes:
            raise invalid(
                f"the request needs {reserve} bytes of KV cache (prompt {len(prompt)} + max_tokens {remaining} tokens), "
                f"more than the worker's budget of {self.limits.kv_cache_bytes} bytes"
            )
        if len(self.waiting) >= self.limits.max_queue:
            raise RpcError(errors.OVERLOADED, f"the queue is full ({self.limits.max_queue} requests waiting)")
        check_stop_strings(req.stop)
        bad = next((t for t in prompt if t >= m.model_vocab_size), None)
        if bad is not None:
            raise invalid(f"prompt token id {bad} is outside the vocabulary (size {m.model_vocab_size})")
        text = TextStream(m.decode, m.vocab_size, req.stop)
        r = Request(
            key=next(self.keys), id=req.id, model=req.model, prompt=prompt, prompt_tokens=prompt_tokens,
            max_tokens=req.max_tokens, resumed=resumed, sampler=sampler, processors=make_processors(req.sampling),
            text=text, stop_token_ids=set(req.stop_token_ids), ignore_eos=req.ignore_eos,
            logprobs=req.logprobs or req.top_logprobs > 0, top_logprobs=req.top_logprobs, emit=emit,
            arrived=time.monotonic(), reserve=reserve, generated=resumed,
        )
        # A resumed stream picks up where it stopped: the detokeniser holds what it held then
        # (its text was sent already).
        for t in req.resume_tokens:
            if text.push(t)[1]:
                r.end("stop")
        if r.done is None and resumed == req.max_tokens:
            r.end("length")
        return r

    def _admit(self) -> None:
        while self.waiting:
            front = self.waiting[0]
            if front.done is None and (
                len(self.running) >= self.limits.max_sequences
                or self.kv_reserved + front.reserve > self.limits.kv_cache_bytes
            ):
                break
            r = self.waiting.popleft()
            self.kv_reserved += r.reserve
            self.running.append(r)
            if r.done is None:
                self.backends[r.model].add(r)

    # ---- stepping ------------------------------------------------------------------------

    def _step(self) -> None:
        for name, backend in list(self.backends.items()):
            if not backend.busy():
                continue
            try:
                prefilled, tokens = backend.step()
            except Exception as e:
                log.exception("a step of model `%s` failed", name)
                error = {"code": errors.ENGINE_FAILURE, "message": f"{type(e).__name__}: {e}"}
                for r in self.running:
                    if r.model == name:
                        r.end("error", error)
                m = self.models[name]
                self.backends[name] = type(backend)(m.model, self.limits.max_sequences, self.limits.prefill_chunk)
                continue
            self.shared.prefilled_tokens += prefilled
            for req, token, logprobs in tokens:
                if req.done is None:
                    self._read(req, int(token), logprobs)
        self.shared.steps += 1

    def _read(self, r: Request, token: int, logprobs) -> None:
        self.shared.decoded_tokens += 1
        if r.first_token is None:
            r.first_token = time.monotonic()
        m = self.models[r.model]
        if (not r.ignore_eos and token in m.eos_ids) or token in r.stop_token_ids:
            r.end("stop")
            return
        r.generated += 1
        text, stopped = r.text.push(token)
        event = {"type": "token", "token_ids": [token], "text": text}
        if r.logprobs:
            event["logprobs"] = [logprobs[token].astype(mx.float32).item()]
        if r.top_logprobs > 0:
            event["top_logprobs"] = [top_list(m, logprobs, r.top_logprobs)]
        r.emit(event)
        if stopped:
            r.end("stop")
        elif r.generated >= r.max_tokens:
            r.end("length")

    def _cancel_all(self) -> None:
        for r in itertools.chain(self.waiting, self.running):
            r.end("cancelled")

    def _sweep(self) -> None:
        ended = [r for r in self.running if r.done is not None]
        if ended:
            self.running = [r for r in self.running if r.done is None]
            for r in ended:
                self.kv_reserved -= r.reserve
                backend = self.backends.get(r.model)
                if backend is not None:
                    backend.remove(r)
        queued = [r for r in self.waiting if r.done is not None]
        if queued:
            self.waiting = deque(r for r in self.waiting if r.done is None)
        for r in ended + queued:
            self._finish(r)

    def _finish(self, r: Request) -> None:
        reason, error = r.done
        text = r.text.finish() if reason in ("stop", "length") else ""
        self.counts[{"stop": "stopped", "length": "length", "cancelled": "cancelled", "error": "failed"}[reason]] += 1
        now = time.monotonic()
        event = {
            "type": "final",
            "finish_reason": reason,
            "text": text,
            "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.generated, "cached_tokens": 0},
            "total_ms": (now - r.arrived) * 1000.0,
        }
        if r.first_token is not None:
            event["time_to_first_token_ms"] = (r.first_token - r.arrived) * 1000.0
        if error is not None:
            event["error"] = error
        r.emit(event)

    # ---- figures -------------------------------------------------------------------------

    def _publish(self) -> None:
        s = self.shared
        s.queue_depth = len(self.waiting)
        s.active_sequences = len(self.running)
        s.memory = {"active": mx.get_active_memory(), "peak": mx.get_peak_memory(), "cache": mx.get_cache_memory()}

    def _publish_models(self) -> None:
        self.shared.models = sorted(self.models)

    def _info(self, m: LoadedModel) -> dict:
        return m.info(self._kv_bytes(m.name))

    def _kv_bytes(self, name: str) -> int:
        # Tokens in the cache of each running sequence of the model, at its bytes per token.
        m = self.models.get(name)
        tokens = sum(r.prefill_progress + max(0, r.generated - r.resumed) for r in self.running if r.model == name)
        return tokens * m.kv_bytes_per_token if m else 0


def top_list(m: LoadedModel, logprobs, k: int) -> list:
    """The `k` most likely tokens, most likely first, with each token's own text."""
    k = min(k, logprobs.shape[-1])
    idx = mx.argpartition(-logprobs, kth=k - 1)[:k]
    values = logprobs[idx].astype(mx.float32)
    pairs = sorted(zip(idx.tolist(), values.tolist()), key=lambda p: -p[1])
    return [{"token_id": t, "text": m.decode([t], skip_special_tokens=False), "logprob": v} for t, v in pairs]


def rss_bytes() -> int:
    """Resident set size of this process; 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except Exception:
        return 0


def memory(shared: Shared) -> dict:
    return dict(shared.memory, rss=rss_bytes())
