"""Protocol conformance suite for mlx-serving workers (docs/protocol.md).

The worker under test is a command line, given as a JSON list in `WORKER_CMD` or with
`--worker-cmd`, e.g. `WORKER_CMD='["target/release/mlx-serving-worker"]'`. Each test starts the
worker with its own flags appended, drives it over its pipes and checks what comes back.
"""

import json
import os
import shlex
from pathlib import Path

import pytest

from worker import Worker

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
MODEL = "qwen3-bf16"


def pytest_addoption(parser):
    parser.addoption("--worker-cmd", default=None, help="the worker command as a JSON list (default: $WORKER_CMD)")


@pytest.fixture(scope="session")
def worker_cmd(request):
    raw = request.config.getoption("--worker-cmd") or os.environ.get("WORKER_CMD")
    if not raw:
        pytest.exit("give the worker command: WORKER_CMD='[\"path/to/worker\"]' or --worker-cmd", returncode=2)
    try:
        cmd = json.loads(raw)
    except ValueError:
        cmd = shlex.split(raw)
    assert isinstance(cmd, list) and cmd and all(isinstance(c, str) for c in cmd), raw
    return cmd


def model_dir(name: str = MODEL) -> str:
    return str(FIXTURES / "models" / name)


def golden(name: str) -> dict:
    return json.loads((FIXTURES / "golden" / f"{name}.json").read_text())


@pytest.fixture
def start(worker_cmd):
    """Starts workers with extra flags; each is stopped (and checked) at the end of the test."""
    started = []

    def run(*args, model: bool = True, heartbeat_ms: int = 1000) -> Worker:
        flags = ["--heartbeat-ms", str(heartbeat_ms)]
        if model:
            flags += ["--model", model_dir(), "--model-name", "m"]
        w = Worker(worker_cmd + flags + list(args))
        started.append(w)
        return w

    yield run
    for w in started:
        w.stop()
        w.assert_clean_stdout()


@pytest.fixture(scope="module")
def shared(worker_cmd):
    """One worker with the fixture model loaded as `m`, for tests that leave it as they found it."""
    w = Worker(worker_cmd + ["--heartbeat-ms", "200", "--model", model_dir(), "--model-name", "m"])
    yield w
    w.stop()
    w.assert_clean_stdout()
