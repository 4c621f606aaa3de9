"""Step trace: what each instance ran and how long its iteration took, inside the running server.

The planner's latency model is normally fitted from steps timed in isolation (scheduler/planner/profile.py).
Inside a serving process the same step also pays for what shares the cores with it: the event loop
(HTTP parsing, token emission, detokenizing), the other instances' Python work (one GIL), and the gap
before the loop schedules the next step. A trace of real iterations lets the planner fit the model
to that (`scheduler.planner.trace_fit.fit_trace`). Off unless EngineConfig.step_trace > 0 (server:
--step-trace N; GET /debug/steps hands the records over as JSON objects with these fields).

`end` is when the instance is ready for its next step (after the step's events were applied: tokens
emitted, hand-offs made), so end - start is the iteration time a simulator should charge. `arrivals`
counts the requests that entered the cluster while the step ran: in one process their front-end work
(the HTTP handler on the event loop) competes with the step's thread for the GIL and the cores, so a step
grows by some milliseconds per arrival (Profile.arrival_stall_ms).
"""
from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field

from engine.step import Step


@dataclass
class StepRecord:
    instance: str
    role: str
    start: float  # seconds (the cluster's clock)
    prefill: list[tuple[int, int]]  # prompt chunks in the step: (new tokens, cached tokens)
    decode_ctx: int  # decoding requests: sum of their contexts
    decode_batch: int  # ... and their count
    swap_tokens: int  # KV tokens swapped out / in before the forward
    others_busy: bool  # another instance was inside a step or a KV pull at `start` (the simulator
    #                    counts a whole iteration as busy: a slightly wider window)
    end: float | None = None
    arrivals: int = 0  # requests added to the cluster between start and end

    @classmethod
    def of(cls, instance: str, role: str, step: Step, start: float, others_busy: bool) -> StepRecord:
        """Call before the step's tokens are counted as computed."""
        chunks, ctx, batch = step.shape()
        return cls(instance, role, start, chunks, ctx, batch, step.swap_tokens, others_busy)

    @classmethod
    def from_json(cls, d: dict) -> StepRecord:
        return cls(d["instance"], d["role"], d["start"], [tuple(c) for c in d["prefill"]], d["decode_ctx"],
                   d["decode_batch"], d.get("swap_tokens", 0), d["others_busy"], d.get("end"), d.get("arrivals", 0))

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1e3


@dataclass
class StepTrace:
    """The last `capacity` step records; `drain()` hands them over and forgets them."""

    capacity: int
    records: deque[StepRecord] = field(init=False)
    pending: dict[str, StepRecord] = field(default_factory=dict)  # instance -> its running step's record

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"step trace capacity must be >= 1, got {self.capacity}")
        self.records = deque(maxlen=self.capacity)

    def begin(self, instance: str, role: str, step: Step, start: float, others_busy: bool) -> None:
        self.pending[instance] = StepRecord.of(instance, role, step, start, others_busy)

    def arrived(self) -> None:
        """A request entered the cluster: it counts against every step running now."""
        for rec in self.pending.values():
            rec.arrivals += 1

    def end(self, instance: str, end: float) -> None:
        rec = self.pending.pop(instance, None)
        if rec is not None:
            rec.end = end
            self.records.append(rec)

    def drain(self) -> list[StepRecord]:
        out = list(self.records)
        self.records.clear()
        return out
