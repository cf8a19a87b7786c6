"""Parameters of the protocol's methods, parsed from JSON with errors that name the field.

Mirrors the wire types: unknown fields of `request`, `sampling`, `prompt` and messages are
refused; absent optional fields take their defaults; numbers are checked for type and range of
their wire type (`usize`, `u32`, `f32`...).
"""

from dataclasses import dataclass, field
from typing import List, Optional

from .errors import invalid_params

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def _type_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f'string "{value[:40]}"'
    if isinstance(value, list):
        return "a sequence"
    return "a map"


def _wrong(path: str, value, expected: str):
    return invalid_params(f"invalid type: {_type_name(value)}, expected {expected} at `{path}`")


def _int(path, value, lo, hi, expected):
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(path, value, expected)
    if not lo <= value <= hi:
        raise invalid_params(f"invalid value: integer `{value}`, expected {expected} at `{path}`")
    return value


def usize(path, value):
    return _int(path, value, 0, U64_MAX, "usize")


def u32(path, value):
    return _int(path, value, 0, U32_MAX, "u32")


def u64(path, value):
    return _int(path, value, 0, U64_MAX, "u64")


def i32(path, value):
    return _int(path, value, I32_MIN, I32_MAX, "i32")


def f32(path, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong(path, value, "f32")
    return float(value)


def string(path, value):
    if not isinstance(value, str):
        raise _wrong(path, value, "a string")
    return value


def boolean(path, value):
    if not isinstance(value, bool):
        raise _wrong(path, value, "a boolean")
    return value


def list_of(item):
    def parse(path, value):
        if not isinstance(value, list):
            raise _wrong(path, value, "a sequence")
        return [item(f"{path}[{i}]", v) for i, v in enumerate(value)]

    return parse


def _object(path, value, known) -> dict:
    if not isinstance(value, dict):
        raise _wrong(path, value, "a map")
    for key in value:
        if key not in known:
            expected = ", ".join(f"`{k}`" for k in known)
            raise invalid_params(f"unknown field `{key}`, expected one of {expected} at `{path}`")
    return value


def required(obj: dict, path: str, name: str, parse):
    if name not in obj:
        raise invalid_params(f"missing field `{name}`" + (f" at `{path}`" if path else ""))
    return parse(f"{path}.{name}" if path else name, obj[name])


def optional(obj: dict, path: str, name: str, parse, default):
    if name not in obj:
        return default
    return parse(f"{path}.{name}" if path else name, obj[name])


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int = 20
    seed: Optional[int] = None


_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "repetition_context_size", "seed")


def parse_sampling(path, value) -> Sampling:
    o = _object(path, value, _SAMPLING)
    d = Sampling()
    seed = o.get("seed")
    return Sampling(
        temperature=optional(o, path, "temperature", f32, d.temperature),
        top_p=optional(o, path, "top_p", f32, d.top_p),
        top_k=optional(o, path, "top_k", i32, d.top_k),
        min_p=optional(o, path, "min_p", f32, d.min_p),
        repetition_penalty=optional(o, path, "repetition_penalty", f32, d.repetition_penalty),
        repetition_context_size=optional(o, path, "repetition_context_size", usize, d.repetition_context_size),
        seed=None if seed is None else u64(f"{path}.seed", seed),
    )


@dataclass
class Message:
    role: str
    content: str


def parse_message(path, value) -> Message:
    o = _object(path, value, ("role", "content"))
    return Message(role=required(o, path, "role", string), content=required(o, path, "content", string))


@dataclass
class Prompt:
    """Exactly one of the three is set."""

    text: Optional[str] = None
    token_ids: Optional[List[int]] = None
    messages: Optional[List[Message]] = None


_PROMPT = {"text": string, "token_ids": list_of(u32), "messages": list_of(parse_message)}


def parse_prompt(path, value) -> Prompt:
    if isinstance(value, dict) and len(value) == 1:
        (kind, inner), = value.items()
        if kind not in _PROMPT:
            raise invalid_params(f"unknown variant `{kind}`, expected one of `text`, `token_ids`, `messages` at `{path}`")
        return Prompt(**{kind: _PROMPT[kind](f"{path}.{kind}", inner)})
    if isinstance(value, dict):
        raise invalid_params(f"`{path}` must have exactly one of `text`, `token_ids`, `messages`, got {len(value)} fields")
    raise _wrong(path, value, "one of `text`, `token_ids`, `messages`")


@dataclass
class GenerateRequest:
    id: str
    model: str
    prompt: Prompt
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: List[str] = field(default_factory=list)
    stop_token_ids: List[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    resume_tokens: List[int] = field(default_factory=list)


_REQUEST = (
    "id", "model", "prompt", "max_tokens", "sampling", "stop", "stop_token_ids",
    "ignore_eos", "logprobs", "top_logprobs", "resume_tokens",
)


def parse_request(path, value) -> GenerateRequest:
    o = _object(path, value, _REQUEST)
    return GenerateRequest(
        id=required(o, path, "id", string),
        model=required(o, path, "model", string),
        prompt=required(o, path, "prompt", parse_prompt),
        max_tokens=required(o, path, "max_tokens", usize),
        sampling=optional(o, path, "sampling", parse_sampling, Sampling()),
        stop=optional(o, path, "stop", list_of(string), []),
        stop_token_ids=optional(o, path, "stop_token_ids", list_of(u32), []),
        ignore_eos=optional(o, path, "ignore_eos", boolean, False),
        logprobs=optional(o, path, "logprobs", boolean, False),
        top_logprobs=optional(o, path, "top_logprobs", usize, 0),
        resume_tokens=optional(o, path, "resume_tokens", list_of(u32), []),
    )


def method_params(params, takes_none: bool = False) -> dict:
    """The params object of a call: named parameters, absent meaning none. A method without
    parameters also takes an empty list."""
    if params is None or (takes_none and params == []):
        return {}
    if not isinstance(params, dict):
        raise invalid_params(f"invalid type: {_type_name(params)}, expected named parameters (a map)")
    return params
