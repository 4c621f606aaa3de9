"""Stop conditions: token-level (EOS, stop_token_ids, lengths) and incremental stop strings."""
from __future__ import annotations

from dataclasses import dataclass

from engine.request import Request


@dataclass(frozen=True)
class StopRule:
    """The model's token-level stops, shared by every policy of an engine (the simulator: none but lengths)."""

    eos_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 62

    def check(self, req: Request) -> str | None:
        return check_stop(req, self.eos_ids, self.max_model_len)

    def stop_ids(self, req: Request) -> set[int]:
        """Token ids that end req (their text is not shown, as in vLLM)."""
        ids = set(req.params.stop_token_ids)
        if not req.params.ignore_eos:
            ids |= self.eos_ids
        return ids


def check_stop(req: Request, eos_ids: set[int] | frozenset[int], max_model_len: int) -> str | None:
    """Called after a token was appended to req.output_ids: "stop", "length" or None (keep going).

    A stop token wins over a length limit reached on the same step (vLLM does the same). Before
    min_tokens outputs no stop token counts (the sampler keeps them from being drawn at all).
    """
    p = req.params
    last = req.output_ids[-1]
    if len(req.output_ids) >= p.min_tokens and ((not p.ignore_eos and last in eos_ids) or last in p.stop_token_ids):
        return "stop"
    if (p.max_tokens is not None and len(req.output_ids) >= p.max_tokens) or req.num_tokens >= max_model_len:
        return "length"
    return None


class StopStringMatcher:
    """Feeds detokenized text deltas; releases text that can no longer be part of a stop string.

    The released text never contains a partial stop string: a tail that is a prefix of some stop string
    is held until the next delta decides it. The match is the stop string occurrence that ends first
    (ties: the one that starts first, i.e. the longer), which is what char-by-char streaming would
    find, so the output does not depend on how the text was split into deltas.
    """

    def __init__(self, stops: list[str], include_stop: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self.held = ""  # text not yet released; only ever a proper prefix of some stop string
        self.matched = False

    def feed(self, delta: str, can_stop: bool = True) -> tuple[str, bool]:
        """Returns (text to release now, matched). After a match everything further is dropped.

        can_stop=False (min_tokens not reached yet): nothing matches; a tail that may begin a stop string
        is still held, so a stop string completed by a later delta is found (vLLM's rule)."""
        if self.matched:
            return "", True
        buf = self.held + delta
        # No stop string lay inside `held` (we would have matched), so any match now ends in `delta`.
        best: tuple[int, int] | None = None  # (end, start)
        for s in self.stops if can_stop else ():
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best):
                best = (i + len(s), i)
        if best is not None:
            self.matched, self.held = True, ""
            end, start = best
            return buf[: end if self.include_stop else start], True
        keep = self._partial_len(buf)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """At the end of the request (no match): the held-back tail."""
        out, self.held = self.held, ""
        return "" if self.matched else out

    def _partial_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best
