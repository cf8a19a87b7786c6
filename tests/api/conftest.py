"""Starts the real `mlx-serving serve` (real workers, the bundled fixture models) for the tests."""
import http.client
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release" / "mlx-serving"
MODEL = ROOT / "tests" / "fixtures" / "models" / "qwen3-bf16"
GOLDEN = ROOT / "tests" / "fixtures" / "golden" / "qwen3-bf16.json"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, workers=2, pool="", http=""):
        assert BIN.exists(), f"{BIN} is missing: build it first (cargo build --release)"
        self.port, self.admin_port = free_port(), free_port()
        self.dir = tempfile.mkdtemp(prefix="mlx-serving-api-")
        config = f"""
[pool]
workers = {workers}
heartbeat_interval_ms = 100
{pool}

[http]
listen = "127.0.0.1:{self.port}"
{http}

[admin]
listen = "127.0.0.1:{self.admin_port}"

[[models]]
name = "m"
path = "{MODEL}"
preload = true
"""
        path = Path(self.dir) / "config.toml"
        path.write_text(config)
        self.proc = subprocess.Popen([str(BIN), "serve", "--config", str(path)], env={**os.environ, "RUST_LOG": "warn"})
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if self.get("/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("the server did not become ready")

    def request(self, method, path, body=None, headers=None, raw=None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        c.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        text = r.read().decode()
        c.close()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
        return r.status, payload, dict(r.getheaders())

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def admin(self, method, params=None):
        c = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=30)
        c.request("POST", "/", json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}),
                  {"Content-Type": "application/json"})
        body = json.loads(c.getresponse().read())
        c.close()
        return body["result"]

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture
def make_server():
    made = []

    def make(**kw):
        s = Server(**kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


@pytest.fixture(scope="session")
def golden():
    return json.loads(GOLDEN.read_text())
