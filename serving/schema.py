"""The OpenAI request schema (plus vLLM's extensions) as pydantic models, and pydantic's verdicts turned into
messages that name the field, what it must be and what it got. serving/protocol.py turns a validated body
into engine requests.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.errors import ApiError, bad

MAX_N = 32  # choices per request: each is an engine request, so bound the fan-out
MAX_LOGPROBS = 20  # the sampler's limit
_INT64 = 2**63


# ---------------- the schema: types and ranges, one declaration each ----------------
class _Schema(BaseModel):
    # strict: "8" is not an integer, 1 is not a boolean (OpenAI's API refuses both); extra keys are handled
    # by _check_fields, with names and modes pydantic's own messages do not give.
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Schema):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class SamplingFields(_Schema):
    """Fields both endpoints take."""

    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    user: str | None = None
    # vLLM's sampling extensions
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: Any = None  # string, strings, token ids or lists of them: _prompts() checks, with its own messages
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ChatCompletionRequest(SamplingFields):
    messages: Any = None  # _messages() checks, naming the message and part at fault
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # vLLM's chat-template extensions
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None


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
    # vLLM's, at their defaults
    "use_beam_search": lambda v: v is False,
    "length_penalty": lambda v: v == 1,
    "priority": lambda v: v == 0,
    "allowed_token_ids": lambda v: v == [],
    "bad_words": lambda v: v == [],
    "return_tokens_as_token_ids": lambda v: v is False,
    "request_id": lambda v: isinstance(v, str),  # vLLM's internal id: ours are generated
    "cache_salt": lambda v: isinstance(v, str),  # no prefix cache here to salt
    "mm_processor_kwargs": lambda v: v == {},
}
_UNSUPPORTED_ANYWHERE = {"metadata", "audio", "prediction", "reasoning_effort", "web_search_options",
                         "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structural_tag",
                         "guided_decoding_backend", "logits_processors", "prompt_logprobs", "truncate_prompt_tokens",
                         "chat_template", "vllm_xargs", "kv_transfer_params"}


def _check_fields(body: dict, schema: type[BaseModel], strict: bool, prefix: str = "") -> list[str]:
    """Refuses unsupported features by name; returns the unknown fields (400 instead when strict)."""
    ignored = []
    for name, value in body.items():
        if name in schema.model_fields or value is None:
            continue
        where = prefix + name
        if name in _NOOP or name in _UNSUPPORTED_ANYWHERE:
            if name in _NOOP and _NOOP[name](value):
                continue
            raise bad(f"'{where}' is not supported by this server", where, "unsupported_parameter")
        if strict:
            raise bad(f"unknown field '{where}'", where, "unknown_parameter")
        ignored.append(where)
    return ignored


def validate(schema: type[BaseModel], body: dict, strict: bool) -> tuple[Any, list[str]]:
    ignored = _check_fields(body, schema, strict)
    opts = body.get("stream_options")
    if isinstance(opts, dict):
        ignored += _check_fields(opts, StreamOptions, strict, "stream_options.")
    try:
        return schema.model_validate(body), ignored
    except ValidationError as e:
        raise _explain(e.errors(include_url=False)[0], body, schema) from None


# ---------------- pydantic's verdict -> today's messages: the field, what it must be, what it got ----------------
def type_name(v: Any) -> str:
    return "null" if v is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                     list: "array", dict: "object"}.get(type(v), type(v).__name__)


_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("a boolean", "booleans"),
          str: ("a string", "strings"), dict: ("an object", "objects")}


def _expected(annotation: Any) -> str:
    """'an integer', 'a string or an array of strings', ... from a field's type."""
    out = []
    for t in get_args(annotation) or (annotation,):
        if t is type(None):
            continue
        origin = get_origin(t)
        if origin is list:
            out.append(f"an array of {_WORDS.get(get_args(t)[0], ('', 'values'))[1]}")
        elif origin is dict or (isinstance(t, type) and issubclass(t, BaseModel)):
            out.append("an object")
        else:
            out.append(_WORDS.get(t, (getattr(t, "__name__", str(t)),))[0])
    return " or ".join(out)


def _range(info: Any, integer: bool) -> str:
    lo = hi = None
    lo_open = hi_open = False
    bounds = (("ge", True, False), ("gt", True, True), ("le", False, False), ("lt", False, True))
    for m in info.metadata:
        for attr, is_lo, is_open in bounds:
            v = getattr(m, attr, None)
            if v is not None:
                if is_lo:
                    lo, lo_open = v, is_open
                else:
                    hi, hi_open = v, is_open
    if integer:  # integers read best as plain bounds
        lo = None if lo is None else lo + lo_open
        hi = None if hi is None else hi - hi_open
        return f">= {lo}" if hi is None else f"between {lo} and {hi}" if lo is not None else f"<= {hi}"
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _explain(err: dict, body: dict, schema: type[BaseModel]) -> ApiError:
    loc = err["loc"]
    name, value = str(loc[0]), body.get(loc[0])
    if name == "stream_options" and len(loc) > 1 and loc[1] in StreamOptions.model_fields:
        schema, name, value = StreamOptions, f"stream_options.{loc[1]}", value.get(loc[1])
    info = schema.model_fields[name.rsplit(".", 1)[-1]]
    if err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        integer = int in get_args(info.annotation)
        return bad(f"'{name}' must be {_range(info, integer)}, got {value}", name, "invalid_value")
    return bad(f"'{name}' must be {_expected(info.annotation)}, got {type_name(value)}", name, "invalid_type")
