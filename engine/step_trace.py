"""Step trace: what each instance ran and how long its iteration took, inside the running server.

The planner's latency model is normally fitted from steps timed in isolation (scheduler/profile.py).
Inside a serving process the same step also pays for what shares the cores with it: the event loop
(HTTP parsing, token emission, detokenizing), the other instances' Python work (one GIL), and the gap
before the loop schedules the next step. A trace of real iterations lets the planner fit the model
to that (`scheduler.trace_fit.fit_trace`). Off unless EngineConfig.step_trace > 0 (server: --step-trace N).

One record per step (a plain dict, JSON-ready; times from time.perf_counter, seconds):
    {"instance": "decode1", "role": "decode", "start": t0, "end": t1,
     "prefill": [[new_tokens, cached_tokens], ...],   # prompt chunks in the step
     "decode_ctx": 812, "decode_batch": 6,              # decoding requests: sum of contexts, count
     "swap_tokens": 0,                                  # KV tokens swapped out / in before the forward
     "others_busy": true}                               # another instance was inside a forward or a
                                                        # KV pull at t0 (the simulator counts a whole
                                                        # iteration as busy: a slightly wider window)
`end` is when the loop is ready to schedule this instance's next step (after the tokens were emitted),
so end - start is the iteration time a simulator should charge.
"""
from __future__ import annotations

from collections import deque

from scheduler.batch import Step


def step_shape(step: Step) -> dict:
    """Call before the step's tokens are counted as computed."""
    chunks, ctx, batch = step.shape()
    return {"prefill": chunks, "decode_ctx": ctx, "decode_batch": batch, "swap_tokens": step.swap_tokens}


class StepTrace:
    """The last `capacity` step records; `drain()` hands them over and forgets them."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"step trace capacity must be >= 1, got {capacity}")
        self.records: deque[dict] = deque(maxlen=capacity)
        self.pending: dict[str, dict] = {}  # instance -> its running step's record, until the loop resumes

    def begin(self, instance: str, role: str, step: Step, start: float, others_busy: bool) -> None:
        self.pending[instance] = {"instance": instance, "role": role, "start": start, **step_shape(step),
                                  "others_busy": others_busy}

    def end(self, instance: str, end: float) -> None:
        rec = self.pending.pop(instance, None)
        if rec is not None:
            rec["end"] = end
            self.records.append(rec)

    def drain(self) -> list[dict]:
        out = list(self.records)
        self.records.clear()
        return out
