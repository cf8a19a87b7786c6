"""Heartbeats, shutdown with a deadline, and exit at the end of stdin."""

import time

from conftest import golden

HEARTBEAT_KEYS = {"seq", "uptime_ms", "progress", "queue_depth", "active_sequences", "models", "memory", "draining", "prefix_cache"}


def wait_for_heartbeats(w, n, timeout=30.0):
    deadline = time.monotonic() + timeout
    while len(w.heartbeats_since(0)) < n:
        assert time.monotonic() < deadline, f"fewer than {n} heartbeats in {timeout} s"
        time.sleep(0.02)
    return w.heartbeats_since(0)


def test_heartbeats_arrive_with_increasing_seq(start):
    w = start(heartbeat_ms=100)
    w.result("handshake", {})
    beats = wait_for_heartbeats(w, 5)
    assert all(set(b) == HEARTBEAT_KEYS for b in beats), beats[0]
    seqs = [b["seq"] for b in beats]
    assert seqs == sorted(set(seqs)), seqs
    assert beats[-1]["models"] == ["m"]
    assert set(beats[-1]["memory"]) == {"active", "peak", "cache", "rss"}
    assert beats[-1]["draining"] is False
    # Roughly the interval: five beats of 100 ms take well under ten seconds, and more than 0.2 s.
    times = [t for t, _ in w.heartbeats[:5]]
    assert 0.2 < times[-1] - times[0] < 10.0


def test_heartbeats_keep_arriving_during_a_long_prefill(start):
    # Small chunks, also while no other stream decodes, make the prefill of a near-context prompt
    # take many engine steps.
    w = start("--prefill-chunk", "4", "--prefill-chunk-idle", "4", heartbeat_ms=20)
    before = w.result("stats", {})["progress"]["prefilled_tokens"]
    prompt = [3 + (i * 7) % 900 for i in range(1000)]
    t0 = time.monotonic()
    sub = w.generate({"id": "long", "model": "m", "prompt": {"token_ids": prompt}, "max_tokens": 2, "ignore_eos": True})
    s = w.collect(sub, timeout=120)
    assert s.reason == "length" and len(s.tokens) == 2
    beats = w.heartbeats_since(t0)
    during = [b for b in beats if 0 < b["progress"]["prefilled_tokens"] - before < 999]
    assert len(during) >= 2, f"only {len(during)} heartbeats arrived during the prefill"
    for a, b in zip(beats, beats[1:]):
        assert b["seq"] > a["seq"]
        for k in ("prefilled_tokens", "decoded_tokens", "steps"):
            assert b["progress"][k] >= a["progress"][k], (k, a, b)
    assert all(b["active_sequences"] == 1 and b["models"] == ["m"] for b in during)
    assert any(b["memory"]["rss"] > 0 and b["memory"]["active"] > 0 for b in during)


def test_shutdown_with_a_deadline_cancels_what_runs_and_exits_zero(start):
    w = start()
    subs = []
    for i in range(2):
        sub = w.generate({"id": f"s{i}", "model": "m", "prompt": {"text": f"Stream {i}"}, "max_tokens": 1000, "ignore_eos": True})
        assert w.next_event(sub)["type"] == "token"
        subs.append(sub)
    ack = w.result("shutdown", {"deadline_ms": 100})
    assert ack["in_flight"] == 2 and 0 <= ack["deadline_ms"] <= 100
    for sub in subs:
        s = w.collect(sub)
        assert s.reason == "cancelled" and s.usage["completion_tokens"] < 1000
    # Refused or unanswered: a worker that is exiting admits nothing.
    try:
        r = w.call("generate", {"request": {"id": "late", "model": "m", "prompt": {"text": "late"}, "max_tokens": 4}}, timeout=5)
    except (AssertionError, BrokenPipeError, OSError):
        r = None
    if r is not None:
        assert r["error"]["code"] == 1005, r
    assert w.wait(10) == 0


def test_shutdown_refuses_new_work_and_lets_running_work_finish(start):
    w = start()
    case = golden("qwen3-bf16")["cases"][0]
    sub = w.generate({"id": "short", "model": "m", "prompt": {"token_ids": case["prompt_ids"]}, "max_tokens": 24, "ignore_eos": True})
    assert w.next_event(sub)["type"] == "token"
    ack = w.result("shutdown", {"deadline_ms": 60000})
    assert ack["in_flight"] == 1
    err = w.error("generate", {"request": {"id": "late", "model": "m", "prompt": {"text": "late"}, "max_tokens": 4}})
    assert err["code"] == 1005
    s = w.collect(sub)
    assert s.reason == "length"
    assert [case["greedy_tokens"][0]] + s.tokens == case["greedy_tokens"][:24]
    assert w.wait(10) == 0


def test_closing_stdin_makes_the_worker_exit_within_a_second(start):
    w = start()
    w.result("handshake", {})
    sub = w.generate({"id": "s", "model": "m", "prompt": {"text": "Hello"}, "max_tokens": 1000, "ignore_eos": True})
    assert w.next_event(sub)["type"] == "token"
    t0 = time.monotonic()
    w.close_stdin()
    code = w.wait(5)
    took = time.monotonic() - t0
    assert code == 0
    assert took < 1.0, f"exit took {took:.2f} s"
