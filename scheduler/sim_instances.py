"""Simulated instances: each drives a runtime policy object exactly as the engine's loops do, with
step times from the latency model instead of a forward pass.

Time is in seconds. An instance is busy from the start of an iteration to its end; `kick()` starts
an iteration if it is idle and its policy has work, and is called whenever work may have appeared.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from engine.config import SchedulerConfig
from engine.kv_cache import BlockAllocator
from engine.request import Request, Status
from scheduler.batch import Step
from scheduler.colocated import ColocatedScheduler
from scheduler.decode import DecodeScheduler
from scheduler.latency import LatencyModel
from scheduler.prefill import PrefillScheduler

if TYPE_CHECKING:
    from scheduler.simulator import Simulation


def _swap_seconds(sim: Simulation, step: Step) -> float:
    """Host <-> device copies of a step's swapped requests (the worker does them before the forward)."""
    tokens = step.swap_tokens
    return tokens * sim.profile.kv_bytes_per_token / sim.profile.swap_bandwidth_Bps if tokens else 0.0


class SimInstance:
    def __init__(self, sim: Simulation, name: str, model: LatencyModel, kv_tokens: int) -> None:
        self.sim = sim
        self.name = name
        self.model = model
        bs = sim.profile.block_size
        self.alloc = BlockAllocator(kv_tokens // bs, bs)
        self.busy = False

    @property
    def config(self) -> SchedulerConfig:
        return self.sim.sched_config

    def slowdown(self, phase: str) -> float:
        """The profile's interference factor for `phase` if another instance is busy as this step starts
        (an approximation: the overlap is judged once, at the start)."""
        if any(i.busy for i in self.sim.prefills + self.sim.decodes if i is not self):
            return self.sim.profile.interference.get(phase, 1.0)
        return 1.0


class PrefillInstance(SimInstance):
    """FCFS token-budget batches; a request's blocks stay here until a decode instance pulls it."""

    def __init__(self, sim: Simulation, name: str, model: LatencyModel, kv_tokens: int) -> None:
        super().__init__(sim, name, model, kv_tokens)
        self.sched = PrefillScheduler(self.config, self.alloc)

    def kick(self) -> None:
        if self.busy:
            return
        step = self.sched.schedule()
        if not step:
            return
        self.busy = True
        now = self.sim.now
        for r, _ in step.items:
            r.metrics.prefill_start = now
            r.instance = self
        secs = self.model.prefill_ms([n for _, n in step.items]) / 1e3 * self.slowdown("prefill")
        self.sim.at(now + secs, self._done, step)

    def _done(self, step: Step) -> None:
        now = self.sim.now
        for r, n in step.items:
            r.num_computed += n
            r.output_ids.append(0)  # the first token is emitted at prefill end
            r.metrics.token_times.append(now)
            r.metrics.prefill_end = now
            self.sim.first_token(r)
            if len(r.output_ids) >= r.params.max_tokens:
                self.alloc.free(r.block_table)
                self.sim.finish(r)
            else:
                self.sim.hand_off(r)
        self.busy = False
        self.kick()


class DecodeInstance(SimInstance):
    """Each iteration: pull what admit() allows (the copies serialize on this instance, one request
    after another, bytes / link bandwidth each), free the prefill side's blocks, then one decode step."""

    def __init__(self, sim: Simulation, name: str, model: LatencyModel, kv_tokens: int) -> None:
        super().__init__(sim, name, model, kv_tokens)
        self.sched = DecodeScheduler(self.config, self.alloc)

    def kick(self) -> None:
        if self.busy:
            return
        pulled = self.sched.admit()
        if not pulled:
            self._step()
            return
        self.busy = True
        t = self.sim.now
        kv, bw = self.sim.profile.kv_bytes_per_token, self.sim.profile.transfer_bandwidth_Bps
        for r, _ in pulled:
            r.metrics.transfer_start = t
            r.metrics.transfer_bytes = r.num_computed * kv
            t += r.metrics.transfer_bytes / bw
            r.metrics.transfer_end = t
        self.sim.at(t, self._pulled, pulled)

    def _pulled(self, pulled: list[tuple[Request, list[int]]]) -> None:
        sources = []
        for r, blocks in pulled:
            src = r.instance
            if isinstance(src, PrefillInstance):
                src.alloc.free(r.block_table)  # the prefill side lets go once its copy has landed
                sources.append(src)
            r.block_table = blocks
            r.status = Status.DECODING
            r.metrics.decode_start = self.sim.now
            r.instance = self
        self.busy = False
        for src in sources:
            src.kick()  # freed blocks may admit the next prefill (backpressure released)
        self._step()

    def _step(self) -> None:
        if self.busy:
            return
        step = self.sched.schedule()
        if not step:
            return
        self.busy = True
        secs = _swap_seconds(self.sim, step)
        if step.items:
            secs += (self.model.decode_ms(sum(r.num_tokens for r, _ in step.items), len(step.items)) / 1e3
                     * self.slowdown("decode"))
        self.sim.at(self.sim.now + secs, self._done, step)

    def _done(self, step: Step) -> None:
        now = self.sim.now
        for r, n in step.items:
            r.num_computed += n
            r.output_ids.append(0)
            r.metrics.token_times.append(now)
            if len(r.output_ids) >= r.params.max_tokens:
                self.sched.running.remove(r)
                self.alloc.free(r.block_table)
                self.sim.finish(r)
        self.busy = False
        self.kick()


class ColocatedInstance(SimInstance):
    """One pool, both phases: prefill-first or chunked (ColocatedScheduler decides each step)."""

    def __init__(self, sim: Simulation, name: str, model: LatencyModel, kv_tokens: int, chunked: bool) -> None:
        super().__init__(sim, name, model, kv_tokens)
        self.sched = ColocatedScheduler(self.config, self.alloc, chunked=chunked)

    def kick(self) -> None:
        if self.busy:
            return
        step = self.sched.schedule()
        if not step:
            return
        self.busy = True
        now = self.sim.now
        for r, _ in step.items:
            if r.status is Status.PREFILLING and r.metrics.prefill_start is None:
                r.metrics.prefill_start = now
        chunks, ctx, batch = step.shape()
        secs = _swap_seconds(self.sim, step)
        if step.items:
            secs += self.model.mixed_ms(chunks, ctx, batch) / 1e3 * self.slowdown("prefill" if chunks else "decode")
        self.sim.at(now + secs, self._done, step)

    def _done(self, step: Step) -> None:
        now = self.sim.now
        for r, n in step.items:
            was_prompt = r.status is Status.PREFILLING
            r.num_computed += n
            if r.num_computed < r.num_tokens:
                continue  # a prompt chunk that is not the last: nothing sampled
            r.output_ids.append(0)
            r.metrics.token_times.append(now)
            if was_prompt:
                r.metrics.prefill_end = now
                self.sim.first_token(r)
                self.sched.finished_prompt(r)
            if len(r.output_ids) >= r.params.max_tokens:
                self.sched.decode.running.remove(r)
                self.alloc.free(r.block_table)
                self.sim.finish(r)
        self.busy = False
        self.kick()
