"""handshake, model management, stats, and the error codes of refused requests."""

import pytest

from conftest import model_dir

PREFIX_CACHE_KEYS = {"hits", "misses", "cached_tokens", "evictions", "entries", "bytes"}
MODEL_INFO = {"model", "path", "model_type", "weight_bytes", "kv_cache_bytes", "context_length", "kv_bytes_per_token"}


def req(id="a", model="m", **extra):
    r = {"id": id, "model": model, "prompt": {"text": "Hello"}, "max_tokens": 4}
    r.update(extra)
    return {"request": r}


def test_handshake(start):
    w = start("--max-sequences", "3", "--max-queue", "5", "--prefill-chunk", "64", "--max-line-bytes", "100000",
              "--kv-cache-bytes", "123456789", "--prefix-cache-bytes", "1000000", model=False)
    h = w.result("handshake", {})
    assert h["protocol_version"].split(".")[0] == "1"
    assert isinstance(h["engine"], str) and h["engine"]
    assert h["device"] in ("cpu", "gpu")
    assert h["pid"] == w.proc.pid
    assert {"generate", "cancel"} <= set(h["capabilities"])
    limits = dict(h["limits"])
    # A worker without a prefix cache reports 0 bytes for it.
    assert limits.pop("prefix_cache_bytes") in (0, 1000000)
    assert limits == {"max_sequences": 3, "max_queue": 5, "kv_cache_bytes": 123456789,
                      "max_line_bytes": 100000, "prefill_chunk": 64}
    assert w.result("list_models", {}) == []


def test_load_list_unload(start):
    w = start(model=False)
    path = model_dir()
    info = w.result("load_model", {"model": "x", "path": path})
    assert set(info) == MODEL_INFO
    assert info["model"] == "x" and info["path"] == path and info["model_type"] == "qwen3"
    assert info["context_length"] == 1024 and info["weight_bytes"] > 0 and info["kv_bytes_per_token"] > 0
    assert w.result("load_model", {"model": "x", "path": path}) == info
    err = w.error("load_model", {"model": "x", "path": model_dir("llama-f32")})
    assert err["code"] == 1003
    err = w.error("load_model", {"model": "y", "path": "/no/such/dir"})
    assert err["code"] == 1002 and "/no/such/dir" in err["message"]
    assert [m["model"] for m in w.result("list_models", {})] == ["x"]
    sub = w.generate(req("r", model="x", max_tokens=1000, ignore_eos=True)["request"])
    assert w.next_event(sub)["type"] == "token"
    assert w.result("unload_model", {"model": "x"}) == {"model": "x", "cancelled_requests": 1}
    assert w.collect(sub).reason == "cancelled"
    assert w.result("list_models", {}) == []
    err = w.error("unload_model", {"model": "x"})
    assert err["code"] == 1001
    err = w.error("generate", req(model="x"))
    assert err["code"] == 1001 and "`x`" in err["message"]


def test_stats(shared):
    s = shared.result("stats", {})
    for key in ("uptime_ms", "progress", "queue_depth", "active_sequences", "requests", "models", "memory",
                "kv_reserved_bytes", "limits", "draining", "prefix_cache"):
        assert key in s, key
    assert set(s["prefix_cache"]) == PREFIX_CACHE_KEYS
    assert set(s["progress"]) == {"prefilled_tokens", "decoded_tokens", "steps"}
    assert set(s["requests"]) == {"accepted", "rejected", "stopped", "length", "cancelled", "failed"}
    assert set(s["memory"]) == {"active", "peak", "cache", "rss"}
    assert [m["model"] for m in s["models"]] == ["m"] and set(s["models"][0]) == MODEL_INFO
    assert s["draining"] is False
    before = s
    shared.run(req("counted", max_tokens=5, ignore_eos=True)["request"])
    after = shared.result("stats", {})
    assert after["requests"]["accepted"] == before["requests"]["accepted"] + 1
    assert after["requests"]["length"] == before["requests"]["length"] + 1
    assert after["progress"]["decoded_tokens"] >= before["progress"]["decoded_tokens"] + 5
    assert after["progress"]["prefilled_tokens"] > before["progress"]["prefilled_tokens"]
    assert after["uptime_ms"] >= before["uptime_ms"]
    assert after["memory"]["rss"] > 0 and after["memory"]["active"] > 0


def test_unknown_method_and_mistyped_params(shared):
    assert shared.error("no_such_method", {})["code"] == -32601
    cases = [
        ("load_model", {"model": 5, "path": "/x"}, None),
        ("load_model", {"model": "x"}, "path"),
        ("cancel", {}, "id"),
        ("shutdown", {"deadline_ms": -1}, None),
        ("generate", req(max_tokens="many"), None),
        ("generate", req(temprature=0.5), "temprature"),
        ("generate", req(sampling={"temprature": 0.5}), "temprature"),
        ("generate", {"request": {"id": "a", "model": "m", "prompt": {"txt": "x"}, "max_tokens": 4}}, "txt"),
        ("generate", {"request": {"id": "a", "model": "m", "prompt": {"messages": [{"role": "user", "contents": "x"}]},
                                  "max_tokens": 4}}, "contents"),
        ("generate", {"request": {"id": "a", "model": "m", "max_tokens": 4}}, "prompt"),
        ("generate", {}, "request"),
    ]
    for method, params, named in cases:
        err = shared.error(method, params)
        assert err["code"] == -32602, (method, params, err)
        if named:
            detail = f"{err['message']} {err.get('data')}"
            assert named in detail, (method, params, err)


@pytest.mark.parametrize("extra,says", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5000}, "context"),
    ({"sampling": {"temperature": -1.0}}, "temperature"),
    ({"sampling": {"top_p": 0.0}}, "top_p"),
    ({"sampling": {"min_p": 1.5}}, "min_p"),
    ({"sampling": {"top_k": -1}}, "top_k"),
    ({"sampling": {"repetition_penalty": 0.0}}, "repetition_penalty"),
    ({"prompt": {"text": ""}}, "empty"),
    ({"prompt": {"token_ids": [5, 999999]}}, "999999"),
    ({"stop": ["s"] * 17}, "stop"),
])
def test_refused_requests_get_1003_naming_the_problem(shared, extra, says):
    err = shared.error("generate", req("refused", **extra))
    assert err["code"] == 1003, err
    assert says in err["message"], err


def test_a_duplicate_id_and_a_full_queue_are_refused(start):
    w = start("--max-sequences", "1", "--max-queue", "1")
    long = {"max_tokens": 1000, "ignore_eos": True}
    running = w.generate(req("run", **long)["request"])
    assert w.next_event(running)["type"] == "token"
    err = w.error("generate", req("run", **long))
    assert err["code"] == 1003 and "run" in err["message"]
    queued = w.generate(req("queued", **long)["request"])
    err = w.error("generate", req("refused", **long))
    assert err["code"] == 1004, err
    s = w.result("stats", {})
    assert (s["queue_depth"], s["active_sequences"]) == (1, 1)
    assert w.result("cancel", {"id": "queued"}) is True
    q = w.collect(queued)
    assert q.reason == "cancelled" and q.tokens == []
    s = w.result("stats", {})
    assert (s["queue_depth"], s["active_sequences"]) == (0, 1)
    assert s["requests"]["rejected"] == 2
    assert w.result("cancel", {"id": "run"}) is True
    assert w.collect(running).reason == "cancelled"
