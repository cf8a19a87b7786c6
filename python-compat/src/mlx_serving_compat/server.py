"""Serving the protocol on stdin/stdout: the main thread reads lines, checks the envelope and
hands each method to the engine thread; one lock keeps output lines whole; a heartbeat thread
beats on its own, never waiting on MLX."""

import json
import logging
import math
import os
import random
import threading
import time

from . import errors
from .engine import NO_PREFIX_CACHE, Engine, Shared, memory
from .errors import RpcError, invalid_params
from .params import method_params, parse_request, required, string, u64

log = logging.getLogger("mlx_serving_compat")


def _finite(value):
    """JSON has no infinities or NaN; they travel as null, as serde writes them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class Output:
    """The protocol's file descriptor; each message one line, written whole and flushed."""

    def __init__(self, fd: int):
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, message: dict) -> None:
        try:
            line = json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except ValueError:
            line = json.dumps(_finite(message), ensure_ascii=False, separators=(",", ":"))
        data = line.encode("utf-8") + b"\n"
        with self._lock:
            try:
                while data:
                    data = data[os.write(self._fd, data):]
            except OSError:
                pass  # the reader is gone; stdin's end will follow

    def respond(self, id, result=None, error: RpcError = None) -> None:
        if error is not None:
            self.send({"jsonrpc": "2.0", "id": id, "error": error.to_json()})
        else:
            self.send({"jsonrpc": "2.0", "id": id, "result": result})


class Lines:
    """Reads newline-ended lines of at most `limit` bytes from a file descriptor. A longer line
    is skipped (reported once, as soon as it passes the limit); reading goes on after it."""

    def __init__(self, fd: int, limit: int):
        self._fd, self._limit = fd, limit
        self._buf = bytearray()
        self._skipping = False
        self._eof = False

    def next(self):
        """`("line", bytes)`, `("too_long", None)`, or `None` at end of input."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                if self._skipping:
                    self._skipping = False
                    continue
                if len(line) > self._limit:
                    return ("too_long", None)
                return ("line", line)
            if len(self._buf) > self._limit and not self._skipping:
                self._buf.clear()
                self._skipping = True
                return ("too_long", None)
            if self._skipping:
                self._buf.clear()
            if self._eof:
                return None  # a line without its newline at the end is dropped
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                self._eof = True
            self._buf += chunk


class Server:
    def __init__(self, engine: Engine, out: Output, handshake: dict):
        self.engine = engine
        self.out = out
        self.handshake = handshake

    def serve(self, fd: int, limit: int) -> None:
        """Answers requests until end of input."""
        lines = Lines(fd, limit)
        while True:
            item = lines.next()
            if item is None:
                return
            kind, raw = item
            if kind == "too_long":
                log.warning("refused an input line longer than %d bytes", limit)
                self.out.respond(None, error=RpcError(errors.INVALID_REQUEST, f"line longer than the limit of {limit} bytes"))
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                self.out.respond(None, error=RpcError(errors.INVALID_REQUEST, "line is not valid UTF-8"))
                continue
            if not text.strip():
                continue
            try:
                self.handle_line(text)
            except Exception as e:  # never let one line end the worker
                log.exception("handling a line failed")
                self.out.respond(None, error=RpcError(errors.ENGINE_FAILURE, f"internal error: {type(e).__name__}: {e}"))

    def handle_line(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError) as e:
            self.out.respond(None, error=RpcError(errors.PARSE_ERROR, f"parse error: {e}"))
            return
        if isinstance(msg, list):
            return self._refuse(None, "batch requests are not supported: send one request per line")
        if not isinstance(msg, dict):
            return self._refuse(None, "a request must be a JSON object")
        if "id" not in msg:
            return self._refuse(None, "notifications are not supported: every request needs an `id`")
        id = msg["id"]
        if not (id is None or isinstance(id, str) or (isinstance(id, int) and not isinstance(id, bool) and id >= 0)):
            return self._refuse(None, "invalid request: `id` must be a string, a non-negative integer or null")
        if msg.get("jsonrpc") != "2.0":
            return self._refuse(id, 'invalid request: `jsonrpc` must be "2.0"')
        method = msg.get("method")
        if not isinstance(method, str):
            return self._refuse(id, "invalid request: `method` must be a string")
        handler = getattr(self, "m_" + method, None)
        if handler is None:
            self.out.respond(id, error=RpcError(errors.METHOD_NOT_FOUND, "Method not found"))
            return
        try:
            handler(id, msg.get("params"))
        except RpcError as e:
            self.out.respond(id, error=e)
        except Exception as e:  # a bug here must not end the worker; the caller hears of it
            log.exception("%s failed", method)
            self.out.respond(id, error=RpcError(errors.ENGINE_FAILURE, f"{method} failed: {type(e).__name__}: {e}"))

    def _refuse(self, id, message: str) -> None:
        self.out.respond(id, error=RpcError(errors.INVALID_REQUEST, message))

    def _engine(self, rid, method: str, /, **args) -> None:
        self.engine.submit(method, lambda result, error: self.out.respond(rid, result, error), **args)

    # ---- methods -------------------------------------------------------------------------

    def m_handshake(self, id, params):
        method_params(params, takes_none=True)
        self.out.respond(id, self.handshake)

    def m_load_model(self, id, params):
        p = method_params(params)
        model, path = required(p, "", "model", string), required(p, "", "path", string)
        self._engine(id, "load_model", model=model, path=path)

    def m_unload_model(self, id, params):
        self._engine(id, "unload_model", model=required(method_params(params), "", "model", string))

    def m_list_models(self, id, params):
        method_params(params, takes_none=True)
        self._engine(id, "list_models")

    def m_stats(self, id, params):
        method_params(params, takes_none=True)
        self._engine(id, "stats")

    def m_cancel(self, id, params):
        self._engine(id, "cancel", id=required(method_params(params), "", "id", string))

    def m_shutdown(self, id, params):
        self._engine(id, "shutdown", deadline_ms=required(method_params(params), "", "deadline_ms", u64))

    def m_generate(self, id, params):
        request = required(method_params(params), "", "request", parse_request)
        subscription = random.getrandbits(53) or 1

        def emit(event: dict) -> None:
            self.out.send(
                {"jsonrpc": "2.0", "method": "generate_event", "params": {"subscription": subscription, "result": event}}
            )

        self._engine(id, "generate", request=request, subscription=subscription, emit=emit)

    def m_generate_unsubscribe(self, id, params):
        if isinstance(params, list) and len(params) == 1:
            subscription = params[0]
        elif isinstance(params, dict):
            subscription = required(params, "", "subscription", lambda path, v: v)
        else:
            raise invalid_params("expected the subscription id: `[subscription_id]`")
        if isinstance(subscription, str) and subscription.isdigit():
            subscription = int(subscription)
        self._engine(id, "unsubscribe", subscription=subscription)


def heartbeat(shared: Shared, seq: int) -> dict:
    return {
        "seq": seq,
        "uptime_ms": shared.uptime_ms(),
        "progress": shared.progress(),
        "queue_depth": shared.queue_depth,
        "active_sequences": shared.active_sequences,
        "models": list(shared.models),
        "memory": memory(shared),
        "draining": shared.draining,
        "prefix_cache": NO_PREFIX_CACHE,
    }


def start_heartbeat(shared: Shared, out: Output, period_s: float) -> threading.Thread:
    """A heartbeat notification every `period_s`, the first at once; late ticks are skipped."""

    def run():
        start = time.monotonic()
        tick = 0
        seq = 0
        while True:
            out.send({"jsonrpc": "2.0", "method": "heartbeat", "params": heartbeat(shared, seq)})
            seq += 1
            now = time.monotonic()
            tick = max(tick + 1, int((now - start) / period_s) + 1)
            time.sleep(max(0.0, start + tick * period_s - time.monotonic()))

    t = threading.Thread(target=run, name="heartbeat", daemon=True)
    t.start()
    return t
