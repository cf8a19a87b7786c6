"""The OpenAI-compatible API with the real `openai` package, curl-like raw HTTP, real workers."""
import http.client
import json
import re
import socket
import threading
import time
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]


def client(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def test_chat_without_and_with_streaming(server):
    c = client(server)
    messages = [{"role": "user", "content": "Tell me about the license."}]
    r = c.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12

    chunks = list(c.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content, "streamed and non-streamed greedy text differ"
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completions_without_and_with_streaming(server):
    c = client(server)
    r = c.completions.create(model="m", prompt="Free software is", max_tokens=10, temperature=0, stop=["\n\n"])
    assert r.choices[0].finish_reason in ("length", "stop")
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="m", prompt="Free software is", max_tokens=10, temperature=0, stop=["\n\n"], stream=True) if ch.choices)
    assert streamed == r.choices[0].text


def test_greedy_output_equals_mlx_lm(server, golden):
    c = client(server)
    for case in golden["cases"]:
        want = case["greedy_tokens"]
        r = c.completions.create(model="m", prompt=case["prompt_ids"], max_tokens=len(want), temperature=0,
                                 extra_body={"ignore_eos": True, "return_token_ids": True})
        assert r.choices[0].model_extra["token_ids"] == want, case["name"]
        assert r.usage.prompt_tokens == len(case["prompt_ids"])


def test_seed_and_logprobs(server):
    c = client(server)
    kw = dict(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0.9, seed=11)
    a = c.chat.completions.create(**kw, logprobs=True)
    b = c.chat.completions.create(**kw, logprobs=True)
    assert a.choices[0].message.content == b.choices[0].message.content
    lps = a.choices[0].logprobs.content
    assert len(lps) == 8 and all(lp.logprob <= 0 for lp in lps)


def test_top_logprobs(server):
    c = client(server)
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
                                  logprobs=True, top_logprobs=3)
    for entry in r.choices[0].logprobs.content:
        top = entry.top_logprobs
        assert len(top) == 3
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        # Greedy: the sampled token is the most likely one.
        assert abs(top[0].logprob - entry.logprob) < 1e-6
    comp = c.completions.create(model="m", prompt="Hi", max_tokens=3, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.token_logprobs) == 3 and all(len(t) <= 2 for t in lp.top_logprobs)


def test_priority_header_and_rate_limit(make_server):
    s = make_server(workers=1, http="rate_limit_per_s = 1.0\nrate_limit_burst = 2")
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    status, payload, _ = s.post("/v1/chat/completions", body, headers={"x-priority": "whenever"})
    assert status == 400 and payload["error"]["param"] == "x-priority"
    assert s.post("/v1/chat/completions", body, headers={"x-priority": "urgent"})[0] == 200
    # The burst of 2 is spent (the refused request above counted too); the next waits.
    status, payload, headers = s.post("/v1/chat/completions", body)
    assert status == 429 and payload["error"]["code"] == "rate_limit_exceeded"
    assert int(headers["retry-after"]) >= 1
    time.sleep(1.1)
    assert s.post("/v1/chat/completions", body)[0] == 200


def test_models_health_ready(server):
    assert [m.id for m in client(server).models.list().data] == ["m"]
    assert server.get("/health")[0] == 200
    status, body, _ = server.get("/ready")
    assert status == 200 and body["ready"] is True


def error_of(status, body):
    assert isinstance(body, dict) and "error" in body, body
    e = body["error"]
    assert set(e) == {"message", "type", "param", "code"}, e
    return status, e["param"], e


@pytest.mark.parametrize("body,status,param", [
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "m", "messages": "hello"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, 400, "top_p"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 17}, 400, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tempreature": 1}, 400, "tempreature"),
])
def test_validation_names_the_field(server, body, status, param):
    got, got_param, e = error_of(*server.post("/v1/chat/completions", body)[:2])
    assert (got, got_param) == (status, param), e


def test_malformed_json_and_a_huge_body(server):
    status, param, e = error_of(*server.request("POST", "/v1/chat/completions", raw='{"model": "m", "messages": [')[:2])
    assert status == 400 and param is None and "not valid JSON" in e["message"]
    huge = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    status, param, e = error_of(*server.request("POST", "/v1/chat/completions", raw=huge)[:2])
    assert status == 413 and "exceeds the limit of 1048576 bytes" in e["message"], e
    # The server is unaffected.
    assert client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=2).choices


def test_the_sdk_raises_typed_errors(server):
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=5000)
    assert e.value.body["param"] == "max_tokens" and e.value.body["code"] == "context_length_exceeded"


def stream_raw(server, body, on_event, headers=None):
    """Streams with raw HTTP; calls on_event(data) for each SSE data line; returns when done."""
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    c.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    assert r.status == 200, r.read()
    try:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: "):
                if on_event(line[6:]) is False:
                    break
    finally:
        c.close()


def stalled_stream(server, body, rcvbuf=4096):
    """Sends a streaming request on a socket with a small receive buffer and reads nothing yet.
    Returns the socket; `read_sse(sock)` reads the whole answer later."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(120)
    sock.connect(("127.0.0.1", server.port))
    payload = json.dumps({**body, "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return sock


def read_sse(sock):
    """The rest of a response on `sock`, to the end: its SSE data lines."""
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    sock.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower(), head
    body = b""
    while True:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        body, rest = body + rest[:n], rest[n + 2:]
    return [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]


def test_a_stalled_reader_holds_back_neither_its_worker_nor_the_others(server):
    # One client sends a request and then reads nothing until the worker has generated all of
    # it. The other streams run to the end meanwhile, and the stalled client, once it reads, gets
    # every token with its log-probabilities. (About 1.4 MB of chunks, which the sockets' buffers
    # on this machine can hold; the merging of chunks that pile up behind a reader is tested in
    # the supervisor's stream module.)
    stalled_tokens = 960
    sock = stalled_stream(server, {"model": "m", "messages": [{"role": "user", "content": "stalled"}],
                                   "max_tokens": stalled_tokens, "temperature": 0, "ignore_eos": True,
                                   "return_token_ids": True, "logprobs": True, "top_logprobs": 20})
    got, errors, lock = [], [], threading.Lock()

    def fast(i):
        tokens = []

        def on(data):
            if data != "[DONE]":
                chunk = json.loads(data)
                if chunk["choices"] and chunk["choices"][0].get("token_ids"):
                    tokens.extend(chunk["choices"][0]["token_ids"])
        try:
            stream_raw(server, {"model": "m", "messages": [{"role": "user", "content": f"fast {i}"}], "max_tokens": 48,
                                "temperature": 0, "ignore_eos": True, "return_token_ids": True}, on)
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append(repr(e))
        with lock:
            got.append(len(tokens))

    threads = [threading.Thread(target=fast, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == [48] * 8, (errors, got)
    # The worker finishes the stalled request while its client still reads nothing.
    deadline = time.time() + 120
    while time.time() < deadline:
        workers = server.admin("status")["workers"]
        if all(w["active_sequences"] == 0 for w in workers):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the worker did not finish the stalled request: {workers}")
    lines = read_sse(sock)
    assert lines[-1] == "[DONE]", lines[-3:]
    chunks = [json.loads(x) for x in lines[:-1]]
    ids = [t for c in chunks if c["choices"] for t in c["choices"][0].get("token_ids") or []]
    assert len(ids) == stalled_tokens
    entries = [e for c in chunks if c["choices"] and c["choices"][0].get("logprobs")
               for e in c["choices"][0]["logprobs"]["content"]]
    assert len(entries) == stalled_tokens and all(len(e["top_logprobs"]) == 20 for e in entries)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_client_disconnect_cancels_in_the_worker(server):
    seen = []
    stream_raw(server, {"model": "m", "messages": [{"role": "user", "content": "long"}], "max_tokens": 900,
                        "temperature": 0, "ignore_eos": True}, lambda d: (seen.append(d), len(seen) < 5)[1])
    deadline = time.time() + 10
    while time.time() < deadline:
        workers = server.admin("status")["workers"]
        if all(w["active_sequences"] == 0 and w["in_flight"] == 0 for w in workers):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the worker still runs the sequence: {workers}")


def test_overload_gets_429_with_retry_after_and_no_breaker_opens(make_server):
    s = make_server(workers=1, pool="max_queue_per_model = 2")
    results, lock = [], threading.Lock()

    def call(i):
        r = s.post("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}],
                                            "max_tokens": 200, "ignore_eos": True})
        with lock:
            results.append(r)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r[0] for r in results)
    assert all(c in (200, 429) for c in codes), codes
    limited = [r for r in results if r[0] == 429]
    assert limited and codes.count(200) >= 2, codes
    for status, body, headers in limited:
        assert int(headers["retry-after"]) >= 1
        assert body["error"]["type"] == "rate_limit_error"
    w = s.admin("status")["workers"][0]
    assert w["breaker"] == "closed" and w["consecutive_failures"] == 0, w


def test_api_keys(make_server):
    s = make_server(workers=1, http='api_keys = ["k1"]')
    with pytest.raises(openai.AuthenticationError):
        client(s, api_key="wrong").models.list()
    status, body, _ = s.get("/v1/models")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert [m.id for m in client(s, api_key="k1").models.list().data] == ["m"]
    assert s.get("/health")[0] == 200 and s.get("/ready")[0] == 200 and s.get("/metrics")[0] == 200


def test_a_removed_workers_gauges_leave_the_metrics(make_server):
    s = make_server(workers=2)

    def workers_in_metrics():
        _, text, _ = s.get("/metrics")
        return {x.labels["worker"] for f in text_string_to_metric_families(text) for x in f.samples
                if x.name == "mlx_worker_in_flight"}, text

    deadline = time.time() + 30
    while workers_in_metrics()[0] != {"0", "1"}:
        assert time.time() < deadline, "both workers never showed in /metrics"
        time.sleep(0.2)
    assert s.admin("scale", {"workers": 1})["workers"] == 1
    deadline = time.time() + 60  # the gauges' idle timeout is 10 s; pruning runs on scrapes
    while True:
        seen, text = workers_in_metrics()
        if seen == {"0"}:
            break
        assert time.time() < deadline, f"worker 1 is still in /metrics: {seen}"
        time.sleep(0.5)
    gauges = [f for f in text_string_to_metric_families(text) if f.type == "gauge"]
    assert not [x for f in gauges for x in f.samples if x.labels.get("worker") == "1"]
    assert [x for f in gauges for x in f.samples if x.labels.get("worker") == "0"]
    # Gauges set only when they change are still there. (Counters and histograms keep their
    # series: their totals stay meaningful.)
    assert "mlx_response_cache_entries" in text and "mlx_ready_workers" in text


def test_request_id_is_echoed(server):
    _, _, headers = server.request("GET", "/v1/models", headers={"x-request-id": "abc-123"})
    assert headers["x-request-id"] == "abc-123"
    _, _, headers = server.get("/v1/models")
    assert headers["x-request-id"].startswith("req-")


def test_metrics_parse_and_list_every_documented_metric(server):
    client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=3)
    server.post("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    # A client that goes away mid-stream.
    seen = []
    stream_raw(server, {"model": "m", "messages": [{"role": "user", "content": "bye"}], "max_tokens": 200,
                        "ignore_eos": True}, lambda d: (seen.append(d), len(seen) < 3)[1])
    time.sleep(1.5)  # gauges refresh every second
    status, text, _ = server.get("/metrics")
    assert status == 200
    families = {f.name for f in text_string_to_metric_families(text)}
    names = set(re.findall(r"`(mlx_[a-z_]+)`", (ROOT / "docs" / "metrics.md").read_text()))
    assert names, "docs/metrics.md lists no metrics"
    # The parser drops the _total suffix of counters.
    missing = sorted(n for n in names if n not in families and n.removesuffix("_total") not in families)
    assert not missing, missing
    values = {(x.name, tuple(sorted(x.labels.items()))): x.value
              for f in text_string_to_metric_families(text) for x in f.samples}
    chat = (("model", "m"), ("route", "/v1/chat/completions"))
    assert values[("mlx_http_requests_total", chat + (("status", "200"),))] >= 1
    assert values[("mlx_http_requests_total", chat + (("status", "499"),))] >= 1
    assert values[("mlx_cancellations_total", (("model", "m"),))] >= 1
    assert values[("mlx_request_duration_seconds_count", chat)] >= 1
    assert values[("mlx_time_to_first_token_seconds_count", (("model", "m"),))] >= 2
    # A model nobody serves is refused without its name becoming a label value.
    assert values[("mlx_rejected_requests_total", (("model", ""), ("reason", "invalid")))] >= 1
    assert "nope" not in text


def test_identical_greedy_requests_at_once_get_the_same_answer(server):
    kw = dict(model="m", messages=[{"role": "user", "content": "All together now."}], max_tokens=16, temperature=0)
    results, lock = [], threading.Lock()

    def call(stream):
        c = client(server)
        if stream:
            chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            usage = chunks[-1].usage.completion_tokens
        else:
            r = c.chat.completions.create(**kw)
            text, usage = r.choices[0].message.content, r.usage.completion_tokens
        with lock:
            results.append((text, usage))

    threads = [threading.Thread(target=call, args=(i % 2 == 0,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1, results
    assert results[0][1] == 16


def test_the_response_cache_answers_repeats_with_x_cache(make_server):
    s = make_server(workers=1, http="[http.response_cache]\nenabled = true")
    c = client(s)
    kw = dict(model="m", messages=[{"role": "user", "content": "Cache me."}], max_tokens=8, temperature=0)
    first = c.chat.completions.with_raw_response.create(**kw)
    assert first.headers["x-cache"] == "miss"
    again = c.chat.completions.with_raw_response.create(**kw)
    assert again.headers["x-cache"] == "hit"
    text = first.parse().choices[0].message.content
    assert again.parse().choices[0].message.content == text
    assert again.parse().usage.completion_tokens == 8
    streamed = c.chat.completions.with_raw_response.create(**kw, stream=True)
    assert streamed.headers["x-cache"] == "hit"
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed.parse() if ch.choices) == text
    sampled = c.chat.completions.with_raw_response.create(**{**kw, "temperature": 0.9})
    assert sampled.headers["x-cache"] == "miss"
    status, text, _ = s.get("/metrics")
    values = {(x.name, tuple(sorted(x.labels.items()))): x.value
              for f in text_string_to_metric_families(text) for x in f.samples}
    assert values[("mlx_response_cache_hits_total", ())] == 2
    assert values[("mlx_response_cache_misses_total", ())] == 1
    assert values[("mlx_response_cache_entries", ())] == 1
