"""The boundary between the HTTP front end and the engine: what the server may call, and what comes back.

The real AsyncEngine (serving/engine.py) implements EngineClient; so does the tests' fake engine, so
the server is tested without a model.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from engine.config import EngineConfig, SamplingParams
from engine.request import Metrics
from engine.step import TokenLogprobs
from scheduler.runtime.trace import StepTrace


class QueueFullError(RuntimeError):
    """The admission queue is full: retry later (the server answers 503 with Retry-After)."""


class EngineUnavailableError(RuntimeError):
    """No request can be served: no instance of some role is left in dispatch, or the engine is shut down."""


@dataclass
class RequestOutput:
    """One update of a request's stream: what is new since the previous one. The last update has
    finished=True and also carries the whole result (token_ids, text) and the request's metrics."""

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_tokens: int = 0  # tokens generated so far, these included
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None  # why, when finish_reason is abort or error (None: the caller knows)
    token_ids: list[int] | None = None  # the final update: every generated token
    text: str | None = None  # the final update: every released character
    metrics: Metrics | None = None  # the final update

    def absorb(self, later: RequestOutput) -> None:
        """Fold a later non-final update into this one (what a reader that fell behind gets)."""
        self.new_token_ids += later.new_token_ids
        self.new_text += later.new_text
        self.new_logprobs += later.new_logprobs
        self.num_tokens = later.num_tokens


@dataclass(frozen=True)
class InstanceStats:
    """One instance as /metrics and the dashboard show it."""

    instance: str
    role: str  # prefill | decode | colocated
    device: str
    kv_blocks_used: int
    kv_blocks_total: int
    waiting: int  # queued for prefill
    prefilling: int  # in a prefill step (or partly prefilled, chunked)
    migrating: int  # waiting for their KV to be pulled here
    running: int  # decoding
    swapped: int  # preempted, waiting to resume
    in_step: int = 0  # requests inside the step (or KV pull) the instance is running now
    state: str = "ok"  # ok | failed | hung | dead (anything but ok is out of dispatch)
    faults: int = 0  # steps and KV pulls that raised or hung on it


class EngineClient(Protocol):
    """What server.py and serving/ use of an engine."""

    model_name: str
    max_model_len: int
    config: EngineConfig
    step_trace: StepTrace | None

    @property
    def tokenizer(self): ...  # engine.tokenizer.Tokenizer: encode, decode, apply_chat_template

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request (ValueError: bad input; QueueFullError: come back later; EngineUnavailableError:
        nothing can serve it); closing the iterator aborts it."""
        ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> list[InstanceStats]: ...
