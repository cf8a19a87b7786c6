"""Drives a worker process over its pipes, line by line.

A reader thread parses every stdout line (which must be a JSON-RPC 2.0 object: anything else is
recorded and fails the test) and files it: responses by id, `generate_event` notifications by
subscription, heartbeats in a list of their own.
"""

import itertools
import json
import os
import queue
import subprocess
import threading
import time
from collections import defaultdict

TIMEOUT = 60.0


class Worker:
    def __init__(self, cmd):
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"), MLX_SERVING_LOG="warning")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, env=env)
        self.ids = itertools.count(1000)
        self.cond = threading.Condition()
        self.responses = {}
        self.events = defaultdict(queue.Queue)
        self.heartbeats = []
        self.unexpected = []
        self.closed = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            try:
                msg = json.loads(raw)
                ok = isinstance(msg, dict) and msg.get("jsonrpc") == "2.0"
            except ValueError:
                msg, ok = None, False
            with self.cond:
                if not ok:
                    self.unexpected.append(raw)
                elif msg.get("method") == "heartbeat":
                    self.heartbeats.append((time.monotonic(), msg["params"]))
                elif msg.get("method") == "generate_event":
                    self.events[msg["params"]["subscription"]].put(msg["params"]["result"])
                elif "id" in msg and "method" not in msg:
                    self.responses.setdefault(json.dumps(msg["id"]), []).append(msg)
                else:
                    self.unexpected.append(raw)
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    # ---- sending ------------------------------------------------------------------------

    def send_bytes(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, message) -> None:
        line = message if isinstance(message, str) else json.dumps(message)
        self.send_bytes(line.encode() + b"\n")

    def request(self, method: str, params=None, id=None):
        """Sends a request and returns its id."""
        id = next(self.ids) if id is None else id
        msg = {"jsonrpc": "2.0", "id": id, "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)
        return id

    def response(self, id, timeout: float = TIMEOUT) -> dict:
        key = json.dumps(id)
        with self.cond:
            ok = self.cond.wait_for(lambda: self.responses.get(key) or self.closed, timeout)
            assert ok, f"no response to id {id} within {timeout} s"
            assert self.responses.get(key), f"the worker closed stdout without answering id {id}"
            return self.responses[key].pop(0)

    def call(self, method: str, params=None, timeout: float = TIMEOUT) -> dict:
        """The whole response (result or error)."""
        return self.response(self.request(method, params), timeout)

    def result(self, method: str, params=None):
        r = self.call(method, params)
        assert "result" in r, f"{method} failed: {r}"
        return r["result"]

    def error(self, method: str, params=None) -> dict:
        r = self.call(method, params)
        assert "error" in r and "result" not in r, f"{method} should have failed: {r}"
        return r["error"]

    def null_id_error(self, timeout: float = TIMEOUT) -> dict:
        """The next error response with `id: null` (answers to lines that had no usable id)."""
        return self.response(None, timeout)["error"]

    # ---- streams ------------------------------------------------------------------------

    def generate(self, request: dict) -> int:
        """Starts a stream; returns its subscription id."""
        r = self.call("generate", {"request": request})
        assert "result" in r, f"generate refused: {r}"
        assert isinstance(r["result"], (int, str)), r
        return r["result"]

    def next_event(self, sub, timeout: float = TIMEOUT) -> dict:
        try:
            return self.events[sub].get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event on stream {sub} within {timeout} s") from None

    def collect(self, sub, timeout: float = TIMEOUT) -> "Stream":
        """Reads a stream to its final event, checking that it is a well-formed stream."""
        s = Stream()
        deadline = time.monotonic() + timeout
        while True:
            e = self.next_event(sub, max(0.1, deadline - time.monotonic()))
            if e["type"] == "token":
                s.add(e)
                continue
            assert e["type"] == "final", e
            s.final = e
            s.text += e["text"]
            # Exactly one final event: nothing follows it.
            time.sleep(0.05)
            assert self.events[sub].empty(), f"events after the final event of {sub}"
            return s

    def run(self, request: dict, timeout: float = TIMEOUT) -> "Stream":
        return self.collect(self.generate(request), timeout)

    def heartbeats_since(self, t: float):
        with self.cond:
            return [h for (at, h) in self.heartbeats if at >= t]

    # ---- ending -------------------------------------------------------------------------

    def close_stdin(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.close_stdin()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)

    def assert_clean_stdout(self) -> None:
        assert not self.unexpected, f"stdout carried non-protocol lines: {self.unexpected[:3]}"


class Stream:
    """What one generate stream delivered."""

    def __init__(self):
        self.tokens = []
        self.text = ""
        self.logprobs = []
        self.top_logprobs = []
        self.events = []
        self.final = None

    def add(self, e: dict) -> None:
        assert isinstance(e["token_ids"], list) and e["token_ids"], e
        assert isinstance(e["text"], str), e
        self.events.append(e)
        self.tokens += e["token_ids"]
        self.text += e["text"]
        self.logprobs += e.get("logprobs") or []
        self.top_logprobs += e.get("top_logprobs") or []

    @property
    def reason(self) -> str:
        return self.final["finish_reason"]

    @property
    def usage(self) -> dict:
        return self.final["usage"]
