"""Output processing: tokens -> text deltas, stop strings, and each request's stream of RequestOutputs.

The Cluster (scheduler/runtime/cluster.py) calls `on_token` for every token a step appends and
`on_finish` once per request; this is the engine's Sink. Text is released incrementally: a stop token
(EOS, stop_token_ids) is not shown unless include_stop_str_in_output, as in vLLM, and text that may
still become a stop string is held back until the next token decides (engine/stop.py). Updates carry
only what is new (no per-token copy of everything so far); the final one carries the whole result.

A stream buffers at most one update: a reader that falls behind gets the tokens since its last read as
one update, and one that falls `max_lag` tokens behind (a client that stopped reading its HTTP stream)
has its request aborted, which frees its KV. The engine never waits for a reader.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from engine.request import Request
from engine.stop import StopRule, StopStringMatcher
from scheduler.runtime.lifecycle import Token
from serving.api import RequestOutput


class _Track:
    """A live request's stream and detokenizer state."""

    def __init__(self, req: Request) -> None:
        self.req = req
        p = req.params
        self.pending: RequestOutput | None = None  # what the reader has not taken yet, merged into one
        self.final: RequestOutput | None = None
        self.ready = asyncio.Event()  # pending or final was set
        self.error: str | None = None  # why it was cut short, for the final update
        self.matcher = StopStringMatcher(p.stop, p.include_stop_str_in_output) if p.stop else None
        self.parts: list[str] = []  # released text, in pieces
        self.prefix_offset = 0
        self.read_offset = 0
        self.last: RequestOutput | None = None  # the update of the token that finishes the request


_ERROR = "an engine instance failed while running this request (see GET /health)"


class OutputProcessor:
    def __init__(self, tokenizer, rule: StopRule, max_lag: int = 1024) -> None:
        self.tokenizer = tokenizer
        self.rule = rule
        self.max_lag = max_lag  # tokens a reader may fall behind before its request is aborted
        self.tracks: dict[str, _Track] = {}

    def open(self, req: Request, on_close: Callable[[str], None]) -> AsyncIterator[RequestOutput]:
        """The request's stream; `on_close(request_id)` runs if the consumer leaves before the end."""
        track = self.tracks[req.id] = _Track(req)
        return self._stream(track, on_close)

    def explain(self, request_id: str, message: str) -> None:
        """Why the request is about to be cut short (its final update says so)."""
        track = self.tracks.get(request_id)
        if track is not None and track.error is None:
            track.error = message

    # ---------------- the Sink ----------------
    def on_token(self, event: Token) -> str | None:
        req = event.req
        track = self.tracks.get(req.id)
        if track is None:
            return None
        token_level = self.rule.check(req)
        delta = self._detokenize(track, token_level == "stop" and not req.params.include_stop_str_in_output)
        reason = None
        if track.matcher is not None:
            delta, matched = track.matcher.feed(delta, len(req.output_ids) >= req.params.min_tokens)
            if matched:
                reason = "stop"
            elif token_level is not None:
                delta += track.matcher.flush()
        track.parts.append(delta)
        out = RequestOutput(req.id, req.prompt_ids, [event.token], delta,
                            [event.logprobs] if event.logprobs is not None else [], len(req.output_ids))
        if reason is not None or token_level is not None:
            track.last = out  # the final update carries it
            return reason
        if track.pending is None:
            track.pending = out
        else:
            track.pending.absorb(out)
        track.ready.set()
        if len(track.pending.new_token_ids) > self.max_lag:  # the reader stopped reading: free its KV
            self.explain(req.id, f"the client fell more than {self.max_lag} tokens behind its stream")
            return "abort"
        return None

    def on_finish(self, req: Request, reason: str) -> None:
        track = self.tracks.pop(req.id, None)
        if track is None:
            return
        out = track.last or RequestOutput(req.id, req.prompt_ids, num_tokens=len(req.output_ids))
        out.finished, out.finish_reason, out.metrics = True, reason, req.metrics
        out.token_ids, out.text = list(req.output_ids), "".join(track.parts)
        if reason in ("abort", "error"):
            out.error = track.error or (_ERROR if reason == "error" else None)
        track.final = out
        track.ready.set()

    # ---------------- internals ----------------
    def _detokenize(self, track: _Track, hide_last: bool) -> str:
        """Text delta of the newest token."""
        ids = track.req.output_ids[:-1] if hide_last else track.req.output_ids
        if len(ids) <= track.read_offset:
            return ""
        p = track.req.params
        delta, track.prefix_offset, track.read_offset = self.tokenizer.decode_incremental(
            ids, track.prefix_offset, track.read_offset, p.skip_special_tokens, p.spaces_between_special_tokens)
        return delta

    @staticmethod
    async def _stream(track: _Track, on_close: Callable[[str], None]) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                if track.pending is None and track.final is None:
                    track.ready.clear()
                    await track.ready.wait()
                if track.pending is not None:  # every update before the final one
                    out, track.pending = track.pending, None
                    yield out
                else:
                    yield track.final
                    return
        finally:  # the consumer went away (client disconnect): abort
            if not track.req.finished:
                on_close(track.req.id)
