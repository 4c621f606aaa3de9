"""The step lifecycle every instance policy shares: what happens to requests when a step's results are in.

An instance runs `schedule() -> Step`, executes it, then `complete(step, sampled, now) -> events`.
`complete` is the only place request state moves after a step; the engine (serving/engine.py) and the
simulator (scheduler/planner/simulator.py) both apply the events through the same Cluster
(scheduler/runtime/cluster.py), so there is one copy of this bookkeeping.

Events, in the order they happened within the step:
    Token(req, token, logprobs)  a token was appended to req.output_ids (the first one: req's TTFT)
    HandOff(req)                 req's prompt is done on a prefill instance: a decode instance takes it
    Finished(req, reason)        "stop" | "length" (token-level stops); the Cluster frees its blocks
    Preempted(req)               req was swapped out (or dropped for recompute) by this step
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from engine.request import Request
from engine.step import Sampled, Step
from engine.stop import StopRule


@dataclass(frozen=True)
class Token:
    req: Request
    token: int
    logprobs: object | None = None  # engine.step.TokenLogprobs when the request asked for them


@dataclass(frozen=True)
class HandOff:
    req: Request


@dataclass(frozen=True)
class Finished:
    req: Request
    reason: str


@dataclass(frozen=True)
class Preempted:
    req: Request


Event = Token | HandOff | Finished | Preempted


class Policy(Protocol):
    """An instance's scheduling policy: plain Python over requests, no tensors."""

    def add(self, req: Request) -> None: ...

    def remove(self, req: Request) -> bool:
        """Forget req wherever it is queued or running; True if it was here."""
        ...

    @property
    def load(self) -> int: ...

    def schedule(self) -> Step: ...

    def complete(self, step: Step, sampled: list[Sampled], now: float) -> list[Event]: ...


def advance(step: Step, sampled: list[Sampled], now: float, rule: StopRule) -> list[Event]:
    """Count the step's tokens as computed, append the sampled tokens, and judge token-level stops.

    Returns Token events (each followed by Finished when that token ends its request) and Preempted
    for the step's swap-outs. Policies call this first, then add their own transitions.
    """
    events: list[Event] = [Preempted(r) for r, _ in step.swap_out]
    for req, n in step.items:
        req.num_computed += n
    for s in sampled:
        req = s.req
        req.output_ids.append(s.token)
        req.metrics.token_times.append(now)
        if s.logprobs is not None:
            req.logprobs.append(s.logprobs)
        events.append(Token(req, s.token, s.logprobs))
        reason = rule.check(req)
        if reason is not None:
            events.append(Finished(req, reason))
    return events


def finishing(events: list[Event]) -> set[str]:
    """Ids of the requests a list of events finishes."""
    return {e.req.id for e in events if isinstance(e, Finished)}
