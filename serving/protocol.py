"""OpenAI request bodies -> validated engine requests. Pure: no engine, no HTTP, tests drive it directly.

Every field a user may send is either used, accepted as a no-op only when its value changes
nothing (e.g. `echo: false`, `n` via the engine), or refused with a 400 that names it: nothing is
silently ignored. `null` means "the default", as in OpenAI's API.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from engine.config import SamplingParams

MAX_N = 32  # choices per request: each is an engine request, so bound the fan-out
MAX_LOGPROBS = 20  # the sampler's limit


class ApiError(Exception):
    """An error the client caused (or must wait out); rendered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class GenerateRequest:
    """One API call: its prompts (one per completion prompt; one rendered chat), shared sampling, n choices each."""

    endpoint: str  # "completions" | "chat"
    model: str | None
    prompts: list[str | list[int]]
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # top-N alternatives to report per token; None: no logprobs
    user: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def choice_params(self, i: int) -> SamplingParams:
        """Params of choice i of a prompt: a fresh copy (the engine fills defaults in), seed + i so seeded
        n > 1 choices differ yet stay reproducible."""
        p = self.params
        seed = None if p.seed is None else p.seed + i
        return replace(p, seed=seed, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids))


# ---------------- field readers: type and range, with the field's name in every message ----------------
def _type_name(v: Any) -> str:
    return "null" if v is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                     list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{name}' must be an integer, got {_type_name(v)}", name, "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}" if lo is not None else f"<= {hi}"
        raise bad(f"'{name}' must be {rng}, got {v}", name, "invalid_value")
    return v


def _num(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise bad(f"'{name}' must be a number, got {_type_name(v)}", name, "invalid_type")
    if not ((lo < v if lo_open else lo <= v) and v <= hi):
        raise bad(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name, "invalid_value")
    return float(v)


def _bool(body: dict, name: str) -> bool | None:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {_type_name(v)}", name, "invalid_type")
    return v


def _str(body: dict, name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise bad(f"'{name}' must be a string, got {_type_name(v)}", name, "invalid_type")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("'stop' must be a string or an array of strings", "stop", "invalid_type")
    if any(not s for s in stops):
        raise bad("'stop' strings must be non-empty", "stop", "invalid_value")
    return stops


def _int_list(body: dict, name: str) -> list[int]:
    v = body.get(name)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise bad(f"'{name}' must be an array of integers", name, "invalid_type")
    return v


# ---------------- fields: used, or accepted only at a value that changes nothing ----------------
COMMON = {"model", "stream", "stream_options", "n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
          "stop", "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "user",
          "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output", "logprobs"}
COMPLETION_FIELDS = COMMON | {"prompt"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs"}

# Unsupported features: the values at which they are no-ops (so clients that send defaults still work).
_NOOP: dict[str, Callable[[Any], bool]] = {
    "echo": lambda v: v is False,
    "suffix": lambda v: v == "",
    "best_of": lambda v: v == 1,
    "logit_bias": lambda v: v == {},
    "tools": lambda v: v == [],
    "functions": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "function_call": lambda v: v == "none",
    "parallel_tool_calls": lambda v: isinstance(v, bool),  # meaningless without tools
    "response_format": lambda v: v == {"type": "text"},
    "store": lambda v: v is False,
    "modalities": lambda v: v == ["text"],
    "service_tier": lambda v: v in ("auto", "default"),
}
_UNSUPPORTED_ANYWHERE = {"metadata", "audio", "prediction", "reasoning_effort", "web_search_options"}


def _check_fields(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name in allowed or value is None:
            continue
        if name in _NOOP or name in _UNSUPPORTED_ANYWHERE:
            if name in _NOOP and _NOOP[name](value):
                continue
            raise bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")
        raise bad(f"unknown field '{name}'", name, "unknown_parameter")


def _common(body: dict, endpoint: str, prompts: list, max_tokens: int | None,
            logprobs: int | None) -> GenerateRequest:
    stream = bool(_bool(body, "stream"))
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(opts, dict):
            raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
        for k in opts:
            if k != "include_usage":
                raise bad(f"unknown field 'stream_options.{k}'", f"stream_options.{k}", "unknown_parameter")
        include_usage = bool(_bool(opts, "include_usage"))
    model = _str(body, "model")
    n = _int(body, "n", 1, MAX_N) or 1
    temperature = _num(body, "temperature", 0.0, 2.0)
    top_p = _num(body, "top_p", 0.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", -1)
    min_p = _num(body, "min_p", 0.0, 1.0)
    rep = _num(body, "repetition_penalty", 0.0, 2.0, lo_open=True)
    kw: dict[str, Any] = dict(
        max_tokens=max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=top_k or 0,
        min_p=min_p or 0.0,
        seed=_int(body, "seed"),
        presence_penalty=_num(body, "presence_penalty", -2.0, 2.0) or 0.0,
        frequency_penalty=_num(body, "frequency_penalty", -2.0, 2.0) or 0.0,
        repetition_penalty=1.0 if rep is None else rep,
        stop=_stop(body),
        stop_token_ids=_int_list(body, "stop_token_ids"),
        ignore_eos=bool(_bool(body, "ignore_eos")),
        logprobs=logprobs,
        include_stop_str_in_output=bool(_bool(body, "include_stop_str_in_output")),
    )
    skip = _bool(body, "skip_special_tokens")
    if skip is not None:
        kw["skip_special_tokens"] = skip
    try:
        params = SamplingParams(**kw)
    except ValueError as e:  # a range the checks above missed: still the client's error
        raise bad(str(e)) from None
    return GenerateRequest(endpoint, model, prompts, params, n=n, stream=stream, include_usage=include_usage,
                           logprobs=logprobs, user=_str(body, "user"))


def _max_tokens(body: dict, name: str) -> int | None:
    v = _int(body, name)
    if v is not None and v <= 0:
        raise bad(f"'{name}' must be at least 1, got {v}", name, "invalid_value")
    return v


# ---------------- the two endpoints ----------------
def parse_completion(body: Any) -> GenerateRequest:
    """POST /v1/completions. prompt: a string, an array of strings, an array of token ids, or an array of those."""
    if not isinstance(body, dict):
        raise bad(f"request body must be a JSON object, got {_type_name(body)}")
    _check_fields(body, COMPLETION_FIELDS)
    prompts = _prompts(body.get("prompt"))
    max_tokens = _max_tokens(body, "max_tokens")
    logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS)
    return _common(body, "completions", prompts, 16 if max_tokens is None else max_tokens, logprobs)


def _prompts(v: Any) -> list[str | list[int]]:
    if v is None:
        raise bad("'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(v, str):
        v = [v]
    elif isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        v = [v]  # one prompt of token ids
    if not isinstance(v, list) or not v:
        raise bad("'prompt' must be a non-empty string, array of strings, or array of token ids", "prompt",
                  "invalid_type" if not isinstance(v, list) else "invalid_value")
    for p in v:
        ok_ids = isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        if not (isinstance(p, str) or ok_ids):
            raise bad("'prompt' must be a string, array of strings, or array of token ids", "prompt", "invalid_type")
        if not p:
            raise bad("prompt is empty", "prompt", "invalid_value")
    return v


def parse_chat(body: Any, render: Callable[[list[dict]], list[int]]) -> GenerateRequest:
    """POST /v1/chat/completions. `render` turns validated messages into prompt token ids (the chat template)."""
    if not isinstance(body, dict):
        raise bad(f"request body must be a JSON object, got {_type_name(body)}")
    _check_fields(body, CHAT_FIELDS)
    messages = _messages(body.get("messages"))
    mct, mt = _max_tokens(body, "max_completion_tokens"), _max_tokens(body, "max_tokens")
    lp = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not lp:
        raise bad("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    try:
        prompt = render(messages)
    except Exception as e:  # template errors (e.g. "roles must alternate") are the messages' fault
        raise bad(f"cannot apply the chat template: {e}", "messages") from None
    # chat default: no max_tokens means up to the context window
    return _common(body, "chat", [prompt], mct if mct is not None else mt, (top or 0) if lp else None)


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _messages(v: Any) -> list[dict]:
    if v is None:
        raise bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(v, list) or not v:
        raise bad("'messages' must be a non-empty array", "messages", "invalid_value")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object", where, "invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            what = "is not supported by this server" if role in ("tool", "function") else "is not a valid role"
            raise bad(f"'{where}.role' {role!r} {what}", f"{where}.role")
        for k, val in m.items():
            if k not in ("role", "content", "name") and val is not None:
                raise bad(f"'{where}.{k}' is not supported by this server", f"{where}.{k}", "unsupported_parameter")
        out.append({"role": _ROLES[role], "content": _content(m.get("content"), f"{where}.content")})
    return out


def _content(c: Any, where: str) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        texts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise bad(f"'{where}[{j}]': only text parts are supported, got {kind!r}", f"{where}[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"'{where}' must be a string or an array of text parts, got {_type_name(c)}", where, "invalid_type")
