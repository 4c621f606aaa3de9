"""Engine outputs -> OpenAI response objects: full responses, stream chunks, logprobs and usage."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.step import TokenLogprobs


@dataclass
class Choice:
    """What one choice has produced so far (one engine request)."""

    index: int
    text: str = ""
    num_tokens: int = 0
    prompt_tokens: int = 0
    text_offset: int = 0  # completions logprobs: characters of token text reported so far
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    sent_role: bool = False  # chat streams open each choice with a role delta
    metrics: Any = None  # the engine request's Metrics once finished (TTFT for the access log)


class Formatter:
    """Builds response dicts for one served model. Caches token-id -> text for logprobs."""

    def __init__(self, tokenizer: Any, model: str) -> None:
        self.tokenizer, self.model = tokenizer, model
        self._tokens: dict[int, str] = {}

    def token_str(self, token_id: int) -> str:
        s = self._tokens.get(token_id)
        if s is None:
            # the token's own text (special tokens included), as vLLM reports it
            s = self._tokens[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return s

    # ---------------- logprobs ----------------
    def completion_logprobs(self, choice: Choice, entries: list[TokenLogprobs]) -> dict:
        """Legacy shape: parallel arrays; top_logprobs maps token text -> logprob."""
        tokens, lps, tops, offsets = [], [], [], []
        for e in entries:
            t = self.token_str(e.token_id)
            tokens.append(t)
            lps.append(e.logprob)
            tops.append({self.token_str(i): lp for i, lp in e.top})
            offsets.append(choice.text_offset)
            choice.text_offset += len(t)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, entries: list[TokenLogprobs]) -> dict:
        def item(token_id: int, lp: float) -> dict:
            t = self.token_str(token_id)
            return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                            for e in entries]}

    # ---------------- streaming chunks ----------------
    def completion_chunk(self, rid: str, created: int, choice: Choice, text: str, entries: list[TokenLogprobs] | None,
                         finish: str | None, include_usage: bool, usage_so_far: dict | None = None) -> dict:
        lp = self.completion_logprobs(choice, entries) if entries is not None else None
        c = {"index": choice.index, "text": text, "logprobs": lp, "finish_reason": finish}
        return self._chunk(rid, created, "text_completion", c, include_usage, usage_so_far)

    def chat_chunk(self, rid: str, created: int, choice: Choice, text: str | None, entries: list[TokenLogprobs] | None,
                   finish: str | None, include_usage: bool, usage_so_far: dict | None = None) -> dict:
        delta: dict[str, Any] = {}
        if not choice.sent_role:
            delta["role"] = "assistant"
            choice.sent_role = True
        if text is not None:
            delta["content"] = text
        lp = self.chat_logprobs(entries) if entries is not None else None
        c = {"index": choice.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return self._chunk(rid, created, "chat.completion.chunk", c, include_usage, usage_so_far)

    def _chunk(self, rid: str, created: int, obj: str, choice: dict, include_usage: bool,
               usage_so_far: dict | None) -> dict:
        chunk = {"id": rid, "object": obj, "created": created, "model": self.model, "choices": [choice]}
        if include_usage:
            chunk["usage"] = usage_so_far  # OpenAI: null on every chunk but the last; vLLM's continuous: so far
        return chunk

    def usage_chunk(self, rid: str, created: int, obj: str, choices: list[Choice], num_prompts: int) -> dict:
        return {"id": rid, "object": obj, "created": created, "model": self.model, "choices": [],
                "usage": usage(choices, num_prompts)}

    # ---------------- full responses ----------------
    def completion_response(self, rid: str, created: int, choices: list[Choice], num_prompts: int,
                            logprobs: bool) -> dict:
        out = []
        for c in choices:
            c.text_offset = 0
            lp = self.completion_logprobs(c, c.logprobs) if logprobs else None
            out.append({"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model, "choices": out,
                "usage": usage(choices, num_prompts)}

    def chat_response(self, rid: str, created: int, choices: list[Choice], num_prompts: int, logprobs: bool) -> dict:
        out = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": self.chat_logprobs(c.logprobs) if logprobs else None, "finish_reason": c.finish_reason}
               for c in choices]
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model, "choices": out,
                "usage": usage(choices, num_prompts)}


def usage(choices: list[Choice], num_prompts: int) -> dict:
    """The prompt counts once per prompt, not once per choice (n > 1), as in OpenAI's API."""
    n = len(choices) // max(num_prompts, 1)
    prompt = sum(c.prompt_tokens for c in choices[::n]) if n else 0
    completion = sum(c.num_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def choice_usage(c: Choice) -> dict:
    """One choice's usage so far (vLLM's continuous_usage_stats chunks)."""
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.num_tokens,
            "total_tokens": c.prompt_tokens + c.num_tokens}
