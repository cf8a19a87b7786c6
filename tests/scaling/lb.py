"""Client side of tests/scaling/run.sh: traffic through the balancer, response checks, HAProxy's
runtime API. Python standard library only.

Every request asks for a fixed number of tokens with `ignore_eos`, so a complete answer is known
exactly: finish_reason `length`, `usage.completion_tokens` equal to max_tokens, and for a stream
one chunk per event ending with finish_reason, a usage chunk and `data: [DONE]`.
"""
import argparse
import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse

MODEL = "tiny"
KINDS = ("completion", "chat", "stream-completion", "stream-chat")


class Failed(Exception):
    pass


def post(base, path, body, timeout, on_first_event=None):
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        resp = conn.getresponse()
        if on_first_event is None:
            return resp.status, resp.getheader("content-type", ""), resp.read()
        lines = []
        while line := resp.readline():
            if not lines and line.startswith(b"data: "):
                on_first_event()
            lines.append(line)
        return resp.status, resp.getheader("content-type", ""), b"".join(lines)
    except (OSError, http.client.HTTPException) as e:
        raise Failed(f"{type(e).__name__}: {e}") from None
    finally:
        conn.close()


def get(base, path, timeout=5):
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def check_body(kind, status, ctype, raw, max_tokens):
    if status != 200:
        raise Failed(f"HTTP {status}: {raw[:200]!r}")
    if kind.startswith("stream"):
        return check_stream(kind, ctype, raw, max_tokens)
    v = json.loads(raw)
    choice = v["choices"][0]
    text = choice["message"]["content"] if kind == "chat" else choice["text"]
    if not isinstance(text, str) or choice["finish_reason"] != "length":
        raise Failed(f"incomplete answer: {raw[:200]!r}")
    if v["usage"]["completion_tokens"] != max_tokens:
        raise Failed(f"usage {v['usage']} for max_tokens {max_tokens}")


def check_stream(kind, ctype, raw, max_tokens):
    if not ctype.startswith("text/event-stream"):
        raise Failed(f"content-type {ctype!r}")
    events = [line[len("data: "):] for line in raw.decode().split("\n") if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        raise Failed(f"stream without [DONE] after {len(events)} events")
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        raise Failed(f"error event: {[c for c in chunks if 'error' in c][0]}")
    want = "chat.completion.chunk" if kind == "stream-chat" else "text_completion"
    if any(c.get("object") != want for c in chunks):
        raise Failed(f"a chunk is not a {want}")
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    if reasons.count("length") != 1 or reasons[-1] != "length":
        raise Failed(f"finish reasons {reasons[-3:]}")
    usage = chunks[-1].get("usage")
    if not usage or usage["completion_tokens"] != max_tokens:
        raise Failed(f"last chunk's usage {usage} for max_tokens {max_tokens}")


def one(base, kind, max_tokens, timeout=60, on_first_event=None):
    """Sends one request of `kind`; raises Failed unless the answer is complete and well formed."""
    body = {"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    if kind.endswith("chat"):
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": "Tell me about load balancers."}]
    else:
        path = "/v1/completions"
        body["prompt"] = "Once upon a time"
    if kind.startswith("stream"):
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    status, ctype, raw = post(base, path, body, timeout, on_first_event)
    try:
        check_body(kind, status, ctype, raw, max_tokens)
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise Failed(f"malformed answer ({type(e).__name__}: {e}): {raw[:200]!r}") from None


class Load:
    """Clients that send requests of every kind in turn until stopped, recording each one."""

    def __init__(self, base, clients, max_tokens, limit=None):
        self.base, self.max_tokens, self.limit = base, max_tokens, limit
        self.issued = 0
        self.records = []  # (kind, start, end, error or None)
        self.in_flight = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(clients)]

    def client(self, i):
        n = i
        while not self.stop.is_set():
            kind = KINDS[n % len(KINDS)]
            n += 1
            with self.lock:
                if self.limit is not None and self.issued >= self.limit:
                    return
                self.issued += 1
                self.in_flight += 1
            start = time.monotonic()
            try:
                one(self.base, kind, self.max_tokens)
                error = None
            except Failed as e:
                error = str(e)
            with self.lock:
                self.records.append((kind, start, time.monotonic(), error))
                self.in_flight -= 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)


def haproxy(sock, command):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(sock)
        s.sendall(command.encode() + b"\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out.decode()


def servers(sock, backend):
    """HAProxy's `show stat` rows of the backend, by server name (and BACKEND for the total)."""
    lines = haproxy(sock, "show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = {}
    for line in lines[1:]:
        if line:
            row = dict(zip(header, line.split(",")))
            if row["pxname"] == backend:
                rows[row["svname"]] = row
    return rows


def wait_status(sock, backend, server, want, timeout):
    """Seconds until HAProxy shows `server` in state `want` (UP or DOWN)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if servers(sock, backend)[server]["status"].split(" ")[0] == want:
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.05)
    raise Failed(f"{backend}/{server} not {want} after {timeout} s")


def served(base):
    """Completions the supervisor at `base` answered with 200, from its /metrics."""
    status, raw = get(base, "/metrics")
    if status != 200:
        raise Failed(f"/metrics: HTTP {status}")
    total = 0
    for line in raw.decode().splitlines():
        if line.startswith("mlx_http_requests_total{") and 'status="200"' in line and "completions" in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def cmd_traffic(a):
    """Sends --count requests, --clients at a time; all must be complete."""
    start = time.monotonic()
    with Load(a.url, a.clients, a.max_tokens, limit=a.count) as load:
        for t in load.threads:
            t.join(60)
    errors = [r for r in load.records if r[3]]
    for kind, _, _, error in errors[:5]:
        print(f"  {kind}: {error}", file=sys.stderr)
    print(f"{len(load.records)} requests, {len(errors)} failed, {time.monotonic() - start:.1f} s")
    return 1 if errors or len(load.records) < a.count else 0


def cmd_served(a):
    print(served(a.url))
    return 0


def cmd_wait(a):
    print(f"{wait_status(a.socket, a.backend, a.server, a.status, a.timeout):.2f}")
    return 0


def window_report(records, t0, t1, label):
    """Splits the records around the event at t0 (kill or SIGTERM) and its mark-down at t1."""
    before = [r for r in records if r[2] < t0]
    during = [r for r in records if r[2] >= t0 and r[1] < t1]
    after = [r for r in records if r[1] >= t1]
    def failed(rs, streaming):
        return sum(1 for r in rs if r[3] and r[0].startswith("stream") == streaming)
    return {
        "requests": len(records),
        f"before_{label}": len(before),
        "window_requests": len(during),
        "window_failed_nonstreaming": failed(during, False),
        "window_failed_streaming": failed(during, True),
        "window_failed_started_after_event": sum(1 for r in during if r[3] and r[1] >= t0),
        "failed_before": sum(1 for r in before if r[3]),
        "after_markdown": len(after),
        "failed_after_markdown": sum(1 for r in after if r[3]),
        "errors": sorted({r[3] for r in records if r[3]})[:5],
    }


def retries(sock, backend):
    row = servers(sock, backend)["BACKEND"]
    return int(row["wretr"] or 0), int(row["wredis"] or 0)


def cmd_kill(a):
    """Load through the balancer; kill -9 a supervisor; wait for the mark-down; more load."""
    retr0, redis0 = retries(a.socket, a.backend)
    with Load(a.url, a.clients, a.max_tokens) as load:
        time.sleep(a.before)
        with load.lock:
            in_flight = load.in_flight
            t_kill = time.monotonic()
            os.kill(a.pid, signal.SIGKILL)
        markdown = wait_status(a.socket, a.backend, a.server, "DOWN", 30)
        t_down = t_kill + markdown
        time.sleep(a.after)
    retr1, redis1 = retries(a.socket, a.backend)
    report = window_report(load.records, t_kill, t_down, "kill")
    report.update(markdown_s=round(markdown, 2), in_flight_at_kill=in_flight,
                  haproxy_retries=retr1 - retr0, haproxy_redispatches=redis1 - redis0)
    return finish(report, a)


def cmd_drain(a):
    """A long stream on the supervisor, SIGTERM, /ready turns 503 while the stream finishes, and
    requests through the balancer keep succeeding while it drains and after it is gone."""
    result = {}
    started = threading.Event()
    stream = threading.Thread(target=lambda: result.update(
        stream=attempt(a.direct, "stream-completion", a.long_tokens, started.set)))
    retr0, redis0 = retries(a.socket, a.backend)
    with Load(a.url, a.clients, a.max_tokens) as load:
        time.sleep(a.before)
        stream.start()
        if not started.wait(30):
            raise Failed(f"the long stream did not start: {result.get('stream')}")
        t_term = time.monotonic()
        os.kill(a.pid, signal.SIGTERM)
        ready = None
        while time.monotonic() - t_term < 5:
            try:
                status, _ = get(a.direct, "/ready", timeout=2)
            except OSError:
                break
            if status == 503:
                ready = time.monotonic() - t_term
                break
            time.sleep(0.02)
        result["stream_running_at_503"] = stream.is_alive()
        markdown = wait_status(a.socket, a.backend, a.server, "DOWN", 30)
        t_down = t_term + markdown
        stream.join(60)
        time.sleep(a.after)
    retr1, redis1 = retries(a.socket, a.backend)
    report = window_report(load.records, t_term, t_down, "sigterm")
    report.update(ready_503_after_s=None if ready is None else round(ready, 2), markdown_s=round(markdown, 2),
                  long_stream=result.get("stream"), long_stream_running_when_ready_503=result["stream_running_at_503"],
                  haproxy_retries=retr1 - retr0, haproxy_redispatches=redis1 - redis0)
    problems = []
    if ready is None:
        problems.append("/ready did not turn 503 after SIGTERM")
    if not result["stream_running_at_503"]:
        problems.append("the stream had ended before /ready turned 503: nothing shows the drain")
    if result.get("stream") != "ok":
        problems.append(f"the stream in flight at SIGTERM did not finish: {result.get('stream')}")
    failed = sum(1 for r in load.records if r[3])
    if failed:
        problems.append(f"{failed} requests through the balancer failed: a drain should cost none")
    return finish(report, a, problems)


def attempt(base, kind, max_tokens, on_first_event):
    try:
        one(base, kind, max_tokens, timeout=120, on_first_event=on_first_event)
        return "ok"
    except Failed as e:
        return str(e)


def finish(report, a, problems=()):
    problems = list(problems)
    if report["failed_before"]:
        problems.append(f"{report['failed_before']} requests failed before the event")
    if report["failed_after_markdown"]:
        problems.append(f"{report['failed_after_markdown']} requests failed after the mark-down")
    if report["window_failed_nonstreaming"]:
        problems.append(f"{report['window_failed_nonstreaming']} non-streaming requests failed: retries should cover them")
    if report["window_failed_started_after_event"]:
        problems.append(f"{report['window_failed_started_after_event']} requests that started after the event failed")
    if report["after_markdown"] == 0:
        problems.append("no request ran after the mark-down")
    report["problems"] = problems
    with open(a.report, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    return 1 if problems else 0


def cmd_summary(a):
    r = json.load(open(a.report))
    if a.what == "kill":
        print(f"marked down after {r['markdown_s']} s; {r['window_requests']} requests in the window, failed: "
              f"{r['window_failed_nonstreaming']} non-streaming, {r['window_failed_streaming']} streaming "
              f"({r['in_flight_at_kill']} requests in flight on both hosts at the kill); HAProxy retries "
              f"{r['haproxy_retries']}, redispatches {r['haproxy_redispatches']}; "
              f"{r['after_markdown']} requests after the mark-down, all ok")
    else:
        print(f"/ready 503 after {r['ready_503_after_s']} s while its stream ran, the stream finished; "
              f"marked down after {r['markdown_s']} s; {r['window_requests']} requests in the window, "
              f"{r['window_failed_nonstreaming'] + r['window_failed_streaming']} failed; HAProxy retries "
              f"{r['haproxy_retries']}, redispatches {r['haproxy_redispatches']}")
    return 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("traffic")
    t.add_argument("--url", required=True)
    t.add_argument("--count", type=int, default=24)
    t.add_argument("--clients", type=int, default=4)
    t.add_argument("--max-tokens", type=int, default=16)
    s = sub.add_parser("served")
    s.add_argument("--url", required=True)
    w = sub.add_parser("wait")
    w.add_argument("--socket", required=True)
    w.add_argument("--backend", default="mlx_serving")
    w.add_argument("--server", required=True)
    w.add_argument("--status", choices=("UP", "DOWN"), required=True)
    w.add_argument("--timeout", type=float, default=30)
    for name in ("kill", "drain"):
        k = sub.add_parser(name)
        k.add_argument("--url", required=True)
        k.add_argument("--socket", required=True)
        k.add_argument("--backend", default="mlx_serving")
        k.add_argument("--server", required=True)
        k.add_argument("--pid", type=int, required=True)
        k.add_argument("--clients", type=int, default=4)
        k.add_argument("--max-tokens", type=int, default=32)
        k.add_argument("--before", type=float, default=1.0, help="seconds of load before the signal")
        k.add_argument("--after", type=float, default=1.5, help="seconds of load after the mark-down")
        k.add_argument("--report", required=True)
        if name == "drain":
            k.add_argument("--direct", required=True, help="the supervisor's own URL")
            k.add_argument("--long-tokens", type=int, default=400)
    m = sub.add_parser("summary")
    m.add_argument("what", choices=("kill", "drain"))
    m.add_argument("report")
    a = p.parse_args()
    try:
        return {"traffic": cmd_traffic, "served": cmd_served, "wait": cmd_wait, "kill": cmd_kill, "drain": cmd_drain,
                "summary": cmd_summary}[a.cmd](a)
    except Failed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
