"""The request: token ids, counters and where its KV lives. Counts tokens rather than naming phases."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.config import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # queued for prefill
    PREFILLING = "prefilling"
    MIGRATING = "migrating"  # prefill done, KV still in the prefill pool, waiting for a decode instance
    DECODING = "decoding"
    PREEMPTED = "preempted"  # KV dropped (recompute) or swapped out; waits to resume
    FINISHED = "finished"


@dataclass
class Metrics:
    """Lifecycle timestamps (time.perf_counter seconds) and hand-off size."""

    arrival: float = 0.0
    prefill_start: float | None = None
    prefill_end: float | None = None
    transfer_start: float | None = None
    transfer_end: float | None = None
    transfer_bytes: int = 0
    decode_start: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish: float | None = None
    preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None

    @property
    def queueing(self) -> float | None:
        return self.prefill_start - self.arrival if self.prefill_start is not None else None

    @property
    def transfer_time(self) -> float | None:
        if self.transfer_start is None or self.transfer_end is None:
            return None
        return self.transfer_end - self.transfer_start


class Request:
    """One sequence. `num_computed` prompt+output tokens have KV in `block_table`, blocks of the pool of
    the instance `kv_home` (a scheduler.runtime.cluster.Slot)."""

    __slots__ = ("id", "prompt_ids", "params", "output_ids", "num_computed", "block_table", "kv_home",
                 "status", "finish_reason", "metrics", "logprobs", "generator", "swapped", "aborted")

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 arrival: float | None = None) -> None:
        self.id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.output_ids: list[int] = []
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.kv_home = None  # the instance whose pool holds block_table (None: no KV anywhere)
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.metrics = Metrics(arrival=time.perf_counter() if arrival is None else arrival)
        self.logprobs: list = []  # engine.step.TokenLogprobs per output token when params.logprobs is set
        self.generator = None  # torch.Generator when params.seed is set
        self.swapped = None  # host copy of the KV while swapped out
        self.aborted: str | None = None  # cut short ("abort" | "error"): the reason it ends with once the
        # step or pull it is inside reports back

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return (f"Request({self.id!r}, {self.status.value}, prompt={self.num_prompt}, out={len(self.output_ids)}, "
                f"computed={self.num_computed}, blocks={len(self.block_table)})")
