"""What a policy hands a worker (Step: which requests run how many new tokens) and what comes back (Sampled).

A worker in this process runs a Step over the Request objects themselves. One in another process (a Ray
actor, serving/ray_cluster.py) is sent a WireStep instead: the packed tokens, positions and block tables of
the forward (a StepBatch, built by `pack` exactly as the in-process worker builds it), and per sampled row
only what the sampler reads (SampleRow), so both run the same forward and sampling on the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.config import SamplingParams
from engine.request import Request


@dataclass
class Step:
    """One forward pass. items[i] = (request, n): compute n tokens from request.num_computed on.

    A request samples a token after the step iff its computed tokens then reach all its known tokens.
    swap_out / swap_in: requests whose KV moves to / from host memory before the forward runs. A
    swapped-out request's blocks are already free in the allocator (another request may be handed
    them this very step), so the worker copies them out before it runs the forward.
    """

    items: list[tuple[Request, int]] = field(default_factory=list)
    swap_out: list[tuple[Request, list[int]]] = field(default_factory=list)  # (request, blocks it left)
    swap_in: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    @property
    def requests(self) -> list[Request]:
        return [r for r, _ in self.items]

    @property
    def swap_tokens(self) -> int:
        """KV tokens this step copies to or from host memory before its forward."""
        return sum(r.num_computed for r, _ in self.swap_out) + sum(r.num_computed for r in self.swap_in)

    def shape(self) -> tuple[list[tuple[int, int]], int, int]:
        """(prompt chunks [(new tokens, cached tokens)], sum of the decoding requests' contexts, their
        count): what the latency model prices. Call before the step's tokens are counted as computed."""
        chunks, ctx, batch = [], 0, 0
        for r, n in self.items:
            if r.num_computed < r.num_prompt:
                chunks.append((n, r.num_computed))
            else:
                ctx += r.num_tokens
                batch += 1
        return chunks, ctx, batch

    def __bool__(self) -> bool:
        return bool(self.items or self.swap_out or self.swap_in)


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log-probability and the top alternatives (after penalties, before temperature)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class Sampled:
    """One request's new token from a step (the request's computed tokens reached all its known tokens)."""

    req: Request
    token: int
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@dataclass
class SampleRow:
    """A sampled request as the sampler reads it, sent to another process: its params, the token ids its
    penalties or min_tokens need (empty when it has none), and its seeded generator's state (None: unseeded,
    or the worker already holds the current state)."""

    id: str
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator_state: torch.Tensor | None = None
    generator: torch.Generator | None = None  # set where it runs, from generator_state

    @classmethod
    def of(cls, req: Request, send_generator: bool) -> SampleRow:
        p = req.params
        penalized = p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        needs_ids = penalized or p.min_tokens > len(req.output_ids)
        state = req.generator.get_state() if send_generator and req.generator is not None else None
        return cls(req.id, p, req.prompt_ids if p.repetition_penalty != 1.0 else [],
                   list(req.output_ids) if needs_ids else [], state)


@dataclass
class StepBatch:
    """A step's forward pass as plain data: every item's new tokens packed into one sequence."""

    ids: list[int]  # [T] token ids
    pos: list[int]  # [T] their positions
    q_lens: list[int]  # new tokens per item
    ctx_lens: list[int]  # context per item after this step
    tables: list[list[int]]  # block table per item
    rows: list[int]  # indices into ids whose logits are sampled, one per sampled request
    samplers: list  # the sampled requests (Request in this process, SampleRow elsewhere), one per row


def pack(step: Step) -> StepBatch:
    """The forward pass of a step: each item runs tokens [num_computed, num_computed + n) of its request; a
    request samples when that reaches all its known tokens."""
    b = StepBatch([], [], [], [], [], [], [])
    for req, n in step.items:
        start = req.num_computed
        b.ids.extend(req.all_ids[start:start + n])
        b.pos.extend(range(start, start + n))
        b.q_lens.append(n)
        b.ctx_lens.append(start + n)
        b.tables.append(req.block_table)
        if start + n == req.num_tokens:
            b.rows.append(len(b.ids) - 1)
            b.samplers.append(req)
    return b


@dataclass
class WireStep:
    """A Step for a worker in another process. swap_out: (request id, blocks to copy to host memory there);
    swap_in: (request id, blocks to copy them back into); drop: requests it may forget (host copies,
    generators). return_generators: send back the seeded rows' generator states (the request moves on to
    another process: prefill -> decode)."""

    batch: StepBatch
    swap_out: list[tuple[str, list[int]]] = field(default_factory=list)
    swap_in: list[tuple[str, list[int]]] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)
    return_generators: bool = False


@dataclass
class WireResult:
    """What comes back: (request id, token, logprobs) per sampled row, and generator states when asked."""

    sampled: list[tuple[str, int, TokenLogprobs | None]]
    generators: dict[str, torch.Tensor] = field(default_factory=dict)
