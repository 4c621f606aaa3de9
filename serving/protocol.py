"""OpenAI request bodies -> validated engine requests. Pure: no engine, no HTTP, tests drive it directly.

The request surface is OpenAI's plus vLLM's documented extensions (min_tokens, ignore_eos, stop_token_ids,
include_stop_str_in_output, skip_special_tokens, spaces_between_special_tokens, top_k, min_p,
repetition_penalty, stream_options.continuous_usage_stats, add_generation_prompt, continue_final_message,
chat_template_kwargs, documents), declared once as pydantic models below; `null` means "the default"
wherever OpenAI accepts it. Every field is either used, accepted only at a value that changes nothing
(e.g. `echo: false`), or refused with a 400 that names it. Fields nobody here knows are ignored and
reported back (the server logs them: vLLM's behaviour), or refused with a 400 when `strict` (OpenAI's).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from engine.config import SamplingParams
from serving.errors import bad
from serving.schema import ChatCompletionRequest, CompletionRequest, SamplingFields, type_name, validate

# Sampling fields whose default a server may set (the checkpoint's generation config, or flags).
DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


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
    continuous_usage: bool = False  # vLLM: usage so far on every stream chunk
    logprobs: int | None = None  # top-N alternatives to report per token; None: no logprobs
    user: str | None = None
    ignored: list[str] = field(default_factory=list)  # unknown fields, ignored (not strict)

    def choice_params(self, i: int) -> SamplingParams:
        """Params of choice i of a prompt: a fresh copy (the engine fills defaults in), seed + i so seeded
        n > 1 choices differ yet stay reproducible."""
        p = self.params
        seed = None if p.seed is None else p.seed + i
        return replace(p, seed=seed, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids))


# ---------------- from a validated schema to a GenerateRequest ----------------
def _common(r: SamplingFields, endpoint: str, prompts: list, max_tokens: int | None, logprobs: int | None,
            ignored: list[str], defaults: Mapping[str, float] | None) -> GenerateRequest:
    stream = bool(r.stream)
    opts = r.stream_options
    if opts is not None and not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    include_usage = bool(opts and opts.include_usage)
    stops = [] if r.stop is None else [r.stop] if isinstance(r.stop, str) else r.stop
    if any(not s for s in stops):
        raise bad("'stop' strings must be non-empty", "stop", "invalid_value")
    if r.min_tokens and max_tokens is not None and r.min_tokens > max_tokens:
        raise bad(f"'min_tokens' ({r.min_tokens}) must be at most the maximum output length ({max_tokens})",
                  "min_tokens", "invalid_value")
    sampling = {**OPENAI_DEFAULTS, **(defaults or {})}
    for name in DEFAULTABLE:
        if getattr(r, name) is not None:
            sampling[name] = getattr(r, name)
    kw: dict[str, Any] = dict(
        max_tokens=max_tokens,
        temperature=float(sampling["temperature"]),
        top_p=float(sampling["top_p"]),
        top_k=int(sampling["top_k"]),
        min_p=float(sampling["min_p"]),
        repetition_penalty=float(sampling["repetition_penalty"]),
        seed=r.seed,
        presence_penalty=r.presence_penalty or 0.0,
        frequency_penalty=r.frequency_penalty or 0.0,
        stop=stops,
        stop_token_ids=r.stop_token_ids or [],
        ignore_eos=bool(r.ignore_eos),
        min_tokens=r.min_tokens or 0,
        logprobs=logprobs,
        include_stop_str_in_output=bool(r.include_stop_str_in_output),
    )
    for name in ("skip_special_tokens", "spaces_between_special_tokens"):
        if getattr(r, name) is not None:
            kw[name] = getattr(r, name)
    try:
        params = SamplingParams(**kw)
    except ValueError as e:  # a range the schema missed: still the client's error
        raise bad(str(e)) from None
    return GenerateRequest(endpoint, r.model, prompts, params, n=r.n or 1, stream=stream, include_usage=include_usage,
                           continuous_usage=include_usage and bool(opts.continuous_usage_stats),
                           logprobs=logprobs, user=r.user, ignored=ignored)


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad(f"request body must be a JSON object, got {type_name(body)}")
    return body


# ---------------- the two endpoints ----------------
def parse_completion(body: Any, strict: bool = False, defaults: Mapping[str, float] | None = None) -> GenerateRequest:
    """POST /v1/completions. prompt: a string, an array of strings, an array of token ids, or an array of those.

    strict: unknown fields are a 400 (else ignored, listed in .ignored). defaults: the server's sampling
    defaults for fields the request leaves out (else OpenAI's)."""
    r, ignored = validate(CompletionRequest, _object(body), strict)
    prompts = _prompts(r.prompt)
    return _common(r, "completions", prompts, 16 if r.max_tokens is None else r.max_tokens, r.logprobs, ignored,
                   defaults)


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


def parse_chat(body: Any, render: Callable[..., str], strict: bool = False,
               defaults: Mapping[str, float] | None = None) -> GenerateRequest:
    """POST /v1/chat/completions. `render(messages, add_generation_prompt, **template_kwargs)` is the chat
    template; strict and defaults as in parse_completion."""
    r, ignored = validate(ChatCompletionRequest, _object(body), strict)
    messages = _messages(r.messages)
    top = r.top_logprobs
    if top is not None and not r.logprobs:
        raise bad("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    add_gen = r.add_generation_prompt is not False
    cont = bool(r.continue_final_message)
    if cont and add_gen:  # vLLM's rule: the two contradict each other (add_generation_prompt defaults to true)
        raise bad("'continue_final_message' and 'add_generation_prompt' cannot both be true (set "
                  "'add_generation_prompt': false to continue the last message)", "continue_final_message")
    if cont and messages[-1]["role"] != "assistant":
        raise bad("'continue_final_message' needs the last message to be the assistant's", "continue_final_message")
    kwargs = dict(r.chat_template_kwargs or {})
    if r.documents is not None:
        kwargs["documents"] = r.documents
    try:
        prompt = render(messages, add_gen and not cont, **kwargs)
    except Exception as e:  # template errors (e.g. "roles must alternate") are the messages' fault
        raise bad(f"cannot apply the chat template: {e}", "messages") from None
    if cont:  # end the prompt right after the last message's text, so the model carries on with it
        last = messages[-1]["content"]
        cut = prompt.rfind(last) if last else -1
        if last and cut < 0:
            raise bad("cannot continue the final message: the chat template changes its text", "messages")
        prompt = prompt[: cut + len(last)] if last else prompt
    mct, mt = r.max_completion_tokens, r.max_tokens
    # chat default: no max_tokens means up to the context window
    return _common(r, "chat", [prompt], mct if mct is not None else mt, (top or 0) if r.logprobs else None,
                   ignored, defaults)


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
            if k not in ("role", "content", "name") and val is not None and not (k == "tool_calls" and val == []):
                raise bad(f"'{where}.{k}' is not supported by this server", f"{where}.{k}", "unsupported_parameter")
        content = m.get("content")
        if content is None and role == "assistant":  # OpenAI: an assistant turn may have null content
            content = ""
        out.append({"role": _ROLES[role], "content": _content(content, f"{where}.content")})
    return out


def _content(c: Any, where: str) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        texts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type_name(part)
                raise bad(f"'{where}[{j}]': only text parts are supported, got {kind!r}", f"{where}[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"'{where}' must be a string or an array of text parts, got {type_name(c)}", where, "invalid_type")
