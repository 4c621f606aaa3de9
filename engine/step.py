"""What a policy hands a worker (Step: which requests run how many new tokens) and what comes back (Sampled)."""
from __future__ import annotations

from dataclasses import dataclass, field

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
