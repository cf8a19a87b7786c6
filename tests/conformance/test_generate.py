"""generate: greedy output equal to mlx-lm's goldens, stream shape, stop conditions, sampling,
log-probabilities, resumption, cancellation."""

import json
import os
import math
import time

import pytest

from conftest import MODEL, golden, model_dir
from worker import Worker

MODELS = ["qwen3-bf16", "qwen3-q4g64", "llama-bf16", "llama-q4g32", "llama-f32", "qwen2-bf16", "qwen2-q8g64", "qwen2-f16", "demo"]
SPECIAL_IDS = {0, 1, 2}  # the fixture tokenizer's special tokens


def req(id, prompt="Hello there", max_tokens=16, **extra):
    r = {"id": id, "model": "m", "prompt": {"text": prompt} if isinstance(prompt, str) else prompt, "max_tokens": max_tokens}
    r.update(extra)
    return r


@pytest.fixture(scope="module")
def golden_worker(worker_cmd):
    w = Worker(worker_cmd + ["--heartbeat-ms", "1000", "--max-sequences", "8"])
    yield w
    w.stop()
    w.assert_clean_stdout()


@pytest.mark.parametrize("name", MODELS)
def test_greedy_output_equals_the_mlx_lm_golden(golden_worker, name):
    w = golden_worker
    g = golden(name)
    info = w.result("load_model", {"model": name, "path": model_dir(name)})
    with open(os.path.join(model_dir(name), "config.json")) as f:
        model_type = json.load(f)["model_type"]
    assert info["model"] == name and info["model_type"] == model_type
    # The three cases run together, so they are batched; the chat case goes through the template.
    subs = []
    for case in g["cases"]:
        if case["name"] == "chat":
            prompt = {"messages": case["messages"]}
        else:
            prompt = {"token_ids": case["prompt_ids"]}
        r = {"id": case["name"], "model": name, "prompt": prompt, "max_tokens": g["max_tokens"], "ignore_eos": True, "logprobs": True}
        subs.append(w.generate(r))
    tol = 1e-4 if g["cases"][0]["first_step_logprobs_dtype"] == "float32" else 0.05
    for case, sub in zip(g["cases"], subs):
        # 4-bit models run slowly on the CPU backend (the demo model: a few tokens/s).
        s = w.collect(sub, timeout=600)
        assert s.tokens == case["greedy_tokens"], f"{name}/{case['name']} differs from mlx-lm"
        assert s.reason == "length"
        assert s.usage["prompt_tokens"] == len(case["prompt_ids"]) and s.usage["completion_tokens"] == g["max_tokens"]
        assert 0 <= s.usage["cached_tokens"] < len(case["prompt_ids"])
        assert len(s.logprobs) == len(s.tokens)
        for got, want in zip(s.logprobs, case["greedy_token_logprobs"]):
            assert abs(got - want) <= tol, (name, case["name"], got, want)
        if not SPECIAL_IDS & set(case["greedy_tokens"]):
            assert s.text == case["greedy_text"], f"{name}/{case['name']} text"
    w.result("unload_model", {"model": name})


def test_a_stream_is_tokens_then_one_final_event(shared):
    s = shared.run(req("shape", max_tokens=12, ignore_eos=True))
    assert len(s.events) == 12 and all(len(e["token_ids"]) == 1 for e in s.events)
    assert s.reason == "length"
    assert s.usage["completion_tokens"] == 12 and s.usage["prompt_tokens"] > 0
    assert isinstance(s.final["total_ms"], (int, float)) and s.final["total_ms"] >= 0
    assert 0 <= s.final["time_to_first_token_ms"] <= s.final["total_ms"]
    assert "logprobs" not in s.events[0] or s.events[0]["logprobs"] is None


def test_prompt_kinds_agree(shared):
    """The same text as `text`, as `token_ids` and through the chat template's pieces."""
    by_text = shared.run(req("t", "The free software", 8, ignore_eos=True))
    g = golden(MODEL)
    short = g["cases"][0]
    by_ids = shared.run(req("i", {"token_ids": short["prompt_ids"]}, 8, ignore_eos=True))
    by_text_of_ids = shared.run(req("ti", short["prompt"], 8, ignore_eos=True))
    assert by_ids.tokens == short["greedy_tokens"][:8]
    assert by_text_of_ids.tokens == by_ids.tokens
    assert by_text_of_ids.usage["prompt_tokens"] == len(short["prompt_ids"])
    assert by_text.usage["completion_tokens"] == 8


def test_stop_string_ends_the_stream_before_it(shared):
    base = shared.run(req("base", "Stop strings are", 40, ignore_eos=True))
    text = base.text
    # A stop string taken from the middle of the output, cut where it first occurs.
    start = len(text) // 2
    stop = text[start:start + 3]
    assert len(stop) == 3, text
    cut = text.find(stop)
    s = shared.run(req("stopped", "Stop strings are", 40, ignore_eos=True, stop=[stop, "never-appears-xyz"]))
    assert s.reason == "stop"
    assert s.text == text[:cut]
    assert s.tokens == base.tokens[: len(s.tokens)]
    assert s.usage["completion_tokens"] == len(s.tokens) < 40


def test_stop_token_id_ends_the_stream_without_it(shared):
    base = shared.run(req("base-ids", "Stop ids", 20, ignore_eos=True))
    stop_id = base.tokens[6]
    first = base.tokens.index(stop_id)
    s = shared.run(req("stop-ids", "Stop ids", 20, ignore_eos=True, stop_token_ids=[stop_id]))
    assert s.reason == "stop"
    assert s.tokens == base.tokens[:first]
    assert s.usage["completion_tokens"] == first


def test_seeded_sampling_is_reproducible(shared):
    sampling = {"temperature": 1.0, "top_p": 0.95, "top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1, "seed": 7}
    a = shared.run(req("s1", "Sampling", 24, ignore_eos=True, sampling=sampling))
    b = shared.run(req("s2", "Sampling", 24, ignore_eos=True, sampling=sampling))
    c = shared.run(req("s3", "Sampling", 24, ignore_eos=True, sampling=dict(sampling, seed=8)))
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert len(a.tokens) == 24


def test_logprobs_and_top_logprobs(shared):
    s = shared.run(req("lp", "Log probabilities", 6, ignore_eos=True, top_logprobs=3))
    assert len(s.logprobs) == 6 and len(s.top_logprobs) == 6
    for token, lp, top in zip(s.tokens, s.logprobs, s.top_logprobs):
        assert lp <= 0 and math.isfinite(lp)
        assert len(top) == 3
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True)
        assert all(isinstance(t["token_id"], int) and isinstance(t["text"], str) for t in top)
        # Greedy: the chosen token is the most likely one.
        assert top[0]["token_id"] == token and top[0]["logprob"] == pytest.approx(lp, abs=1e-6)
    err = shared.error("generate", {"request": req("lp2", top_logprobs=21)})
    assert err["code"] == 1003 and "top_logprobs" in err["message"]


@pytest.mark.parametrize("sampling", [None, {"temperature": 0.9, "seed": 3}])
def test_a_resumed_request_continues_where_the_first_stopped(shared, sampling):
    extra = {"sampling": sampling} if sampling else {}
    whole = shared.run(req("whole", "Resume me", 20, ignore_eos=True, **extra))
    rest = shared.run(req("part", "Resume me", 20, ignore_eos=True, resume_tokens=whole.tokens[:8], **extra))
    assert rest.tokens == whole.tokens[8:]
    assert rest.reason == "length"
    # The resumed request may reuse the first one's keys and values (usage.cached_tokens).
    assert {k: rest.usage[k] for k in ("prompt_tokens", "completion_tokens")} == \
        {k: whole.usage[k] for k in ("prompt_tokens", "completion_tokens")}
    assert 0 <= rest.usage["cached_tokens"] <= rest.usage["prompt_tokens"]
    done = shared.run(req("all", "Resume me", 20, ignore_eos=True, resume_tokens=whole.tokens, **extra))
    assert done.tokens == [] and done.reason == "length" and done.usage["completion_tokens"] == 20
    err = shared.error("generate", {"request": req("x", "Resume me", 4, resume_tokens=[5] * 5)})
    assert err["code"] == 1003 and "resume_tokens" in err["message"]


def test_cancel_ends_one_stream_and_leaves_the_others_intact(shared):
    neighbours = [req(f"n{i}", f"Neighbour {i} says", 30, ignore_eos=True) for i in range(2)]
    alone = [shared.run(r) for r in neighbours]
    victim = shared.generate(req("victim", "Cancel me", 1000, ignore_eos=True))
    subs = [shared.generate(r) for r in neighbours]
    for _ in range(3):
        assert shared.next_event(victim)["type"] == "token"
    assert shared.result("cancel", {"id": "victim"}) is True
    rest = shared.collect(victim)
    assert rest.reason == "cancelled"
    assert rest.usage["completion_tokens"] < 1000
    for sub, a in zip(subs, alone):
        got = shared.collect(sub)
        assert got.tokens == a.tokens and got.reason == "length"
    assert shared.result("cancel", {"id": "victim"}) is False


def test_unsubscribing_cancels_the_request(shared):
    before = shared.result("stats")["requests"]["cancelled"]
    sub = shared.generate(req("gone", "Nobody listens", 1000, ignore_eos=True))
    assert shared.next_event(sub)["type"] == "token"
    r = shared.call("generate_unsubscribe", [sub])
    assert r.get("result") is True, r
    deadline = time.monotonic() + 30
    while True:
        stats = shared.result("stats")
        if stats["active_sequences"] == 0:
            break
        assert time.monotonic() < deadline, "the unsubscribed request kept running"
        time.sleep(0.05)
    assert stats["requests"]["cancelled"] == before + 1
    assert stats["kv_reserved_bytes"] == 0
