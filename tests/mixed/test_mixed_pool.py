"""A mixed pool: 2 Rust workers and 1 Python worker (a `[[pool.groups]]` entry) behind one
supervisor. Greedy output for a fixture model is the same whichever worker serves it, and equals
mlx-lm's recorded tokens.

Needs MLX_SERVING_BIN (the `mlx-serving` binary, with `mlx-serving-worker` beside it) and
PYWORKER (the `mlx-serving-pyworker` script); tests/conformance/run.sh sets both.
"""
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("MLX_SERVING_BIN", str(ROOT / "target/release/mlx-serving"))
PYWORKER = os.environ.get("PYWORKER", str(ROOT / "python-compat/.venv/bin/mlx-serving-pyworker"))
MODELS = ["qwen3-bf16", "llama-bf16"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=120):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def admin(port, method, params=None):
    return post(f"http://127.0.0.1:{port}/", {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}})


@pytest.fixture(scope="module")
def server():
    if not (os.access(BIN, os.X_OK) and os.access(PYWORKER, os.X_OK)):
        pytest.fail(f"needs {BIN} and {PYWORKER}: build the binaries and run tests/conformance/run.sh")
    http, adm = free_port(), free_port()
    tmp = tempfile.TemporaryDirectory()
    models = "\n".join(
        f'[[models]]\nname = "{m}"\npath = "{ROOT}/tests/fixtures/models/{m}"\npreload = true\n' for m in MODELS
    )
    config = f"""
[pool]
workers = 2
heartbeat_interval_ms = 200
start_timeout_ms = 60000

[[pool.groups]]
name = "python"
workers = 1
worker_command = ["{PYWORKER}"]

[http]
listen = "127.0.0.1:{http}"
min_ready_workers = 3

[admin]
listen = "127.0.0.1:{adm}"

{models}
"""
    path = Path(tmp.name) / "config.toml"
    path.write_text(config)
    log = open(Path(tmp.name) / "serve.log", "w")
    proc = subprocess.Popen([BIN, "serve", "--config", str(path)], stdout=log, stderr=log,
                            env={**os.environ, "RUST_LOG": "warn"})
    deadline = time.time() + 120
    while True:
        try:
            if admin(adm, "status")["result"]["ready_workers"] == 3:
                break
        except (urllib.error.URLError, ConnectionError, KeyError):
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("the mixed pool did not get 3 ready workers: " + (Path(tmp.name) / "serve.log").read_text()[-3000:])
        time.sleep(0.2)
    yield http, adm
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    tmp.cleanup()


def workers(adm):
    return admin(adm, "status")["result"]["workers"]


def only(adm, python):
    """Drains every worker but the Python one (python=True) or but the Rust ones."""
    for w in workers(adm):
        is_python = w.get("group") == "python"
        admin(adm, "undrain" if is_python == python else "drain", {"worker": w["id"]})


def complete(http, model, prompt, max_tokens=24):
    r = post(f"http://127.0.0.1:{http}/v1/completions", {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True,
    })
    choice = r["choices"][0]
    return choice["token_ids"], choice["text"]


def golden(model):
    return json.loads((ROOT / "tests/fixtures/golden" / f"{model}.json").read_text())


def test_the_pool_has_both_kinds_of_worker(server):
    _, adm = server
    groups = sorted(str(w.get("group")) for w in workers(adm))
    assert groups == ["None", "None", "python"], groups


@pytest.mark.parametrize("model", MODELS)
def test_greedy_output_is_the_same_whichever_worker_serves_it(server, model):
    http, adm = server
    cases = golden(model)["cases"]
    assert cases, "no golden cases"
    outputs = {}
    for python in (False, True):
        only(adm, python)
        outputs[python] = [complete(http, model, c["prompt_ids"]) for c in cases]
    only(adm, True)
    for w in workers(adm):
        admin(adm, "undrain", {"worker": w["id"]})
    for case, rust, py in zip(cases, outputs[False], outputs[True]):
        assert rust == py, f"{model} {case['name']}: the Rust and the Python worker differ"
        assert rust[0] == case["greedy_tokens"][: len(rust[0])], f"{model} {case['name']}: differs from mlx-lm's tokens"


def test_concurrent_requests_spread_over_both_kinds_agree(server):
    http, adm = server
    model = MODELS[0]
    prompt = golden(model)["cases"][0]["prompt_ids"]
    with ThreadPoolExecutor(9) as ex:
        results = list(ex.map(lambda _: complete(http, model, prompt, 32), range(9)))
    assert all(r == results[0] for r in results), "concurrent greedy requests disagree"
