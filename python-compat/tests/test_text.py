from pathlib import Path

import pytest
from tokenizers import Tokenizer

from mlx_serving_compat.errors import RpcError
from mlx_serving_compat.text import StopMatcher, TextStream

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(FIXTURES / "models" / "qwen3-bf16" / "tokenizer.json"))


def stream(tok, ids, stops=()):
    t = TextStream(lambda ids: tok.decode(ids, skip_special_tokens=True), tok.get_vocab_size(), stops)
    parts, stopped = [], False
    for i in ids:
        text, stopped = t.push(i)
        parts.append(text)
        if stopped:
            break
    return parts, ("" if stopped else t.finish()), stopped


def test_streamed_text_equals_the_whole_decode(tok):
    text = "Ein café in 東京 🙂, and more text: naïve façade."
    ids = tok.encode(text).ids
    parts, tail, _ = stream(tok, ids)
    assert "".join(parts) + tail == tok.decode(ids)
    # No part ends inside a character.
    assert all("\ufffd" not in p for p in parts)


def test_lone_bytes_come_out_as_replacement_characters(tok):
    # The byte-level symbol of 0xE6 (a UTF-8 lead byte) alone, then ASCII.
    ids = [tok.token_to_id("\u00e6"), tok.token_to_id("a"), tok.token_to_id("b")]
    assert None not in ids
    parts, tail, _ = stream(tok, ids)
    assert "".join(parts) + tail == tok.decode(ids)
    assert "\ufffd" in "".join(parts) + tail


def test_stop_strings_cut_before_the_match_and_hold_partial_matches():
    m = StopMatcher(["STOP", "xy"])
    assert m.push("abc ST") == "abc "  # "ST" may start "STOP"
    assert m.push("A") == "STA"
    assert m.push("x") == ""
    assert m.push("y and more") == ""
    assert m.stopped
    m = StopMatcher(["STOP"])
    assert m.push("the ST") == "the "
    assert m.flush() == "ST"


def test_stop_strings_stop_the_stream(tok):
    ids = tok.encode("one two three four").ids
    parts, tail, stopped = stream(tok, ids, ["three"])
    assert stopped and "".join(parts) == "one two "


def test_stop_string_limits():
    with pytest.raises(RpcError):
        StopMatcher(["a"] * 17)
    with pytest.raises(RpcError):
        StopMatcher([""])
    with pytest.raises(RpcError):
        StopMatcher(["x" * 257])
