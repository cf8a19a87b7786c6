"""The engine in process: greedy output equals mlx-lm's golden with continuous batching and
with the one-at-a-time fallback, and the CLI keeps stdout for the protocol."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mlx_serving_compat.engine import Engine, Limits, Shared
from mlx_serving_compat.params import parse_request

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
MODEL = "qwen3-bf16"


def call(engine, method, **args):
    done = threading.Event()
    out = {}

    def reply(result, error):
        out.update(result=result, error=error)
        done.set()

    engine.submit(method, reply, **args)
    assert done.wait(60)
    if out["error"] is not None:
        raise out["error"]
    return out["result"]


def generate(engine, request):
    events, finished = [], threading.Event()

    def emit(event):
        events.append(event)
        if event["type"] == "final":
            finished.set()

    call(engine, "generate", request=parse_request("request", request), subscription=1, emit=emit)
    assert finished.wait(60)
    return events


@pytest.mark.parametrize("batching", [True, False])
def test_greedy_goldens_with_and_without_batching(batching):
    engine = Engine(Limits(prefill_chunk=16), Shared(), batching=batching)
    engine.start()
    call(engine, "load_model", model="m", path=str(FIXTURES / "models" / MODEL))
    golden = json.loads((FIXTURES / "golden" / f"{MODEL}.json").read_text())
    for case in golden["cases"][:2]:
        request = {"id": case["name"], "model": "m", "prompt": {"token_ids": case["prompt_ids"]}, "max_tokens": 32, "ignore_eos": True}
        events = generate(engine, request)
        tokens = [t for e in events if e["type"] == "token" for t in e["token_ids"]]
        assert tokens == case["greedy_tokens"][:32]
        assert events[-1]["finish_reason"] == "length"
    stats = call(engine, "stats")
    assert stats["requests"]["length"] == 2 and stats["kv_reserved_bytes"] == 0
    assert stats["progress"]["decoded_tokens"] >= 64
    call(engine, "shutdown", deadline_ms=0)
    assert engine.stopped.wait(10)


def test_the_cli_answers_on_stdout_and_exits_at_stdin_eof():
    cmd = [sys.executable, "-m", "mlx_serving_compat", "--heartbeat-ms", "50"]
    lines = '{"jsonrpc":"2.0","id":1,"method":"handshake"}\nnot json\n'
    p = subprocess.run(cmd, input=lines.encode(), capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    out = [json.loads(l) for l in p.stdout.decode().splitlines()]
    assert all(m["jsonrpc"] == "2.0" for m in out)
    assert next(m for m in out if m.get("id") == 1)["result"]["pid"] > 0
    assert any(m.get("error", {}).get("code") == -32700 for m in out)


def test_model_name_requires_model():
    p = subprocess.run([sys.executable, "-m", "mlx_serving_compat", "--model-name", "x"], capture_output=True, timeout=60)
    assert p.returncode == 2 and b"--model" in p.stderr
