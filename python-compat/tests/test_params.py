import pytest

from mlx_serving_compat.errors import INVALID_PARAMS, RpcError
from mlx_serving_compat.params import parse_request


def parse(**fields):
    r = {"id": "a", "model": "m", "prompt": {"text": "hi"}, "max_tokens": 4}
    r.update(fields)
    return parse_request("request", r)


def detail(e: RpcError) -> str:
    assert e.code == INVALID_PARAMS
    return e.data


def test_defaults():
    r = parse()
    assert r.prompt.text == "hi" and r.max_tokens == 4
    assert r.sampling.temperature == 0 and r.sampling.top_p == 1 and r.sampling.seed is None
    assert r.stop == [] and r.resume_tokens == [] and not r.ignore_eos and r.top_logprobs == 0


@pytest.mark.parametrize("fields,named", [
    ({"temprature": 1}, "temprature"),
    ({"sampling": {"sed": 1}}, "sed"),
    ({"prompt": {"txt": "x"}}, "txt"),
    ({"prompt": {"messages": [{"role": "user", "text": "x"}]}}, "text"),
    ({"max_tokens": "many"}, "request.max_tokens"),
    ({"max_tokens": -1}, "request.max_tokens"),
    ({"max_tokens": 4.5}, "request.max_tokens"),
    ({"stop_token_ids": [1, True]}, "request.stop_token_ids[1]"),
    ({"sampling": {"temperature": "hot"}}, "request.sampling.temperature"),
    ({"ignore_eos": 1}, "request.ignore_eos"),
])
def test_errors_name_the_field(fields, named):
    with pytest.raises(RpcError) as e:
        parse(**fields)
    assert named in detail(e.value)


def test_a_prompt_has_exactly_one_kind():
    with pytest.raises(RpcError):
        parse(prompt={"text": "a", "token_ids": [1]})
    with pytest.raises(RpcError):
        parse(prompt={})
    assert parse(prompt={"token_ids": [1, 2]}).prompt.token_ids == [1, 2]
    assert parse(prompt={"messages": [{"role": "user", "content": "x"}]}).prompt.messages[0].content == "x"


def test_missing_fields_are_named():
    with pytest.raises(RpcError) as e:
        parse_request("request", {"id": "a", "model": "m", "max_tokens": 1})
    assert "`prompt`" in detail(e.value)
