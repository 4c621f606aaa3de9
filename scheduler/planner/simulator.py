"""Discrete-event simulation of a serving layout: the engine's own scheduling (scheduler/runtime/cluster.py
and the policies it drives) on a virtual clock, with step times from a latency model.

The simulator is a second driver of the same Cluster the engine drives (serving/engine.py): it asks
`next_action`, prices the action instead of running it, and reports back at the priced time. Every
scheduling decision and every piece of request bookkeeping is therefore the engine's. A wake-up is a
zero-delay event, as it is an asyncio wake-up in the engine: requests that arrive at the very same
instant are batched together.

Pipeline parallelism (pp > 1) as DistServe's simulator models it (simdistserve/base/worker.py: one worker
per stage, each with its own queue): a step visits the instance's pp stages in order, holding each for
its share of the time (LatencyModel: the whole step / pp, + pp ms for a prefill); a stage takes the
steps in the order they reach it. Stage 1 is free for the next step once its share is done (the Cluster
lets an instance keep up to pp steps in flight, and the policies leave out the requests inside them);
the step's tokens, hand-offs and finishes apply when its last stage is done. So a request's latency is
~ the whole step time and an instance's throughput ~ pp x. Unlike simdistserve, a step stays one
batch through every stage (simdistserve merges decode batches that meet in a later stage's queue) and
at most pp steps are in flight (simdistserve lets more queue between stages).

Arrivals stall the steps in flight by the profile's arrival_stall_ms (a CPU server's front end shares its
process, its GIL and its cores with the instances' threads): a request that arrives while a step runs makes that
step end later, as the server's step trace shows (StepRecord.arrivals).

Modes:
- disagg: prefill instances -> KV hand-off -> decode instances. The decode side pulls; copies
  serialize on the pulling decode instance (bytes / link bandwidth), before its next step, and the
  prefill side frees its blocks as each copy lands.
- colocated: one pool per instance, prefill-first or chunked.
- prefill / decode: one phase alone, for Algorithm 1's independent search. "prefill": KV leaves the
  instance the moment its prefill ends (only TTFT is judged). "decode": requests arrive prefilled,
  first token at arrival (only TPOT is judged).
"""
from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.config import SamplingParams, SchedulerConfig
from engine.kv_cache import BlockAllocator
from engine.request import Request
from engine.step import Sampled, Step
from engine.stop import StopRule
from scheduler.planner.latency import LatencyModel, Profile
from scheduler.planner.results import RequestResult
from scheduler.planner.workload import SLO
from scheduler.runtime.cluster import Cluster, Execute, Pull, Slot
from scheduler.runtime.lifecycle import Token
from scheduler.runtime.policy import make_policy

Mode = Literal["disagg", "colocated", "prefill", "decode"]


@dataclass(frozen=True)
class Parallel:
    """`count` instances, each of tp x pp devices."""

    tp: int = 1
    pp: int = 1
    count: int = 1

    def __post_init__(self) -> None:
        if min(self.tp, self.pp, self.count) < 1:
            raise ValueError(f"tp, pp and count must be >= 1, got {self}")

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.count


@dataclass(frozen=True)
class Layout:
    mode: Mode
    prefill: Parallel | None = None  # disagg, prefill
    decode: Parallel | None = None  # disagg, decode
    colocated: Parallel | None = None  # colocated
    chunked: bool = False

    def __post_init__(self) -> None:
        need = {"disagg": ("prefill", "decode"), "prefill": ("prefill",), "decode": ("decode",),
                "colocated": ("colocated",)}
        if self.mode not in need:
            raise ValueError(f"unknown mode {self.mode!r}")
        for name in ("prefill", "decode", "colocated"):
            if (getattr(self, name) is not None) != (name in need[self.mode]):
                raise ValueError(f"{self.mode} layout {'needs' if name in need[self.mode] else 'takes no'} {name}")
        if self.chunked and self.mode != "colocated":
            raise ValueError("chunked prefill applies to colocated layouts only")

    @property
    def devices(self) -> int:
        return sum(p.devices for p in (self.prefill, self.decode, self.colocated) if p is not None)


@dataclass(kw_only=True)
class SimulatedRequest(RequestResult):
    arrival: float
    prefill_start: float | None = None
    transfer_time: float | None = None
    preemptions: int = 0


@dataclass
class SimResult:
    requests: list[SimulatedRequest]
    slo: SLO | None
    judged: tuple[bool, bool]  # (ttft, tpot) judged in this mode
    duration: float
    stopped_early: bool = False

    def _ok(self, r: SimulatedRequest, ttft: bool, tpot: bool) -> bool:
        """r meets the SLOs asked for (ttft, tpot) that this mode judges."""
        if self.slo is None:
            raise ValueError("attainment needs an SLO")
        ok_ttft, ok_tpot = r.meets(self.slo.ttft, self.slo.tpot)
        return (ok_ttft or not (ttft and self.judged[0])) and (ok_tpot or not (tpot and self.judged[1]))

    def attainment(self, ttft: bool = True, tpot: bool = True) -> float:
        return sum(self._ok(r, ttft, tpot) for r in self.requests) / len(self.requests)

    @property
    def joint_attainment(self) -> float:
        return self.attainment(True, True)


@dataclass
class Pricer:
    """What an action costs under a profile: all the simulator knows of time."""

    profile: Profile
    models: dict[str, LatencyModel] = field(default_factory=dict)  # slot name -> its instance's latency model
    rng: random.Random = field(default_factory=lambda: random.Random(0))  # draws the profile's step noise, if any

    @staticmethod
    def phase(chunks: list[tuple[int, int]]) -> str:
        """Which of the profile's per-phase terms price a step, from its Step.shape() prompt chunks: a step with
        prompt chunks is a prefill."""
        return "prefill" if chunks else "decode"

    def stall_seconds(self, phase: str) -> float:
        """How much longer a step of `phase` in flight runs per request that arrives meanwhile."""
        return self.profile.arrival_stall_ms.get(phase, 0.0) / 1e3

    def step_stages(self, slot: str, step: Step, others_busy: bool,
                    shape: tuple[list[tuple[int, int]], int, int] | None = None) -> list[float]:
        """Seconds the step holds each pipeline stage of the slot's instance, in order. Stage 1 first does
        the swap copies (host <-> device, before the forward); each stage runs its share of the forward as
        the latency model prices it, slowed by the profile's interference factor if another instance is
        busy as the step starts, and by one of the profile's measured step-noise multipliers if it has them.
        shape: step.shape(), where the caller has it already."""
        prof, model = self.profile, self.models[slot]
        stage = 0.0
        if step.items:
            chunks, ctx, batch = step.shape() if shape is None else shape
            phase = self.phase(chunks)
            slow = prof.interference.get(phase, 1.0) if others_busy else 1.0
            noise = prof.step_noise.get(phase)
            stage = model.mixed_ms(chunks, ctx, batch) / 1e3 * slow * (self.rng.choice(noise) if noise else 1.0)
        swap = step.swap_tokens * prof.kv_bytes_per_token / prof.swap_bandwidth_Bps
        return [swap + stage] + [stage] * (model.pp - 1)

    def step_seconds(self, slot: str, step: Step, others_busy: bool) -> float:
        """The step's latency: from entering stage 1 to leaving the last stage, with no queue between."""
        return sum(self.step_stages(slot, step, others_busy))

    def pull_bytes(self, pull: Pull) -> int:
        return pull.req.num_computed * self.profile.kv_bytes_per_token

    def pull_seconds(self, pull: Pull) -> float:
        return self.pull_bytes(pull) / self.profile.transfer_bandwidth_Bps


@dataclass(eq=False)
class _Running:
    """A step in flight: it reports back at `end`, which arrivals may push later."""

    slot: Slot
    step: Step
    phase: str
    end: float


@dataclass
class Simulation:
    profile: Profile
    layout: Layout
    sched_config: SchedulerConfig
    slo: SLO | None = None
    max_failures: int | None = None  # stop once this many requests are sure to miss (bisection speed-up)
    seed: int = 0  # of the step-noise draws (only a profile with step_noise draws any)
    now: float = 0.0
    slots: list[Slot] = field(default_factory=list)
    cluster: Cluster = field(init=False)
    pricer: Pricer = field(init=False)
    _kicks: set[str] = field(default_factory=set)  # slots with a wake-up pending
    _stage_free: dict[str, list[float]] = field(default_factory=dict)  # slot -> when each stage is next free
    _running: list[_Running] = field(default_factory=list)  # steps in flight
    _heap: list = field(default_factory=list)
    _seq: int = 0
    _failed: set[str] = field(default_factory=set)
    _stopped: bool = False

    def __post_init__(self) -> None:
        lay, prof = self.layout, self.profile
        self.judge = (lay.mode != "decode", lay.mode != "prefill")
        self.pricer = Pricer(prof, rng=random.Random(self.seed))
        for role, spec in (("prefill", lay.prefill), ("decode", lay.decode), ("colocated", lay.colocated)):
            if spec is None:
                continue
            cap = prof.kv_capacity(spec.tp, spec.pp, role)
            if spec.tp not in prof.tp or not cap:
                raise ValueError(f"profile has no tp={spec.tp} pp={spec.pp} layout")
            for i in range(spec.count):
                alloc = BlockAllocator(cap // prof.block_size, prof.block_size)
                slot = Slot(f"{role}{i}", role, make_policy(role, self.sched_config, alloc, _RULE, lay.chunked), alloc,
                            depth=spec.pp)
                self.slots.append(slot)
                self._stage_free[slot.name] = [0.0] * spec.pp
                self.pricer.models[slot.name] = prof.model_for(spec.tp, spec.pp)
        self.cluster = Cluster(self.slots, lambda: self.now, self._wake, self)

    # ---- the event heap ----
    def at(self, t: float, fn: Callable, arg: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, arg))

    # ---- the driver: price each action, report it back when its time has come ----
    def _wake(self, slot: Slot) -> None:
        if slot.name not in self._kicks:
            self._kicks.add(slot.name)
            self.at(self.now, self._kick, slot)

    def _kick(self, slot: Slot) -> None:
        self._kicks.discard(slot.name)
        free = self._stage_free[slot.name]
        if not self.cluster.ready(slot) or free[0] > self.now:
            return
        action = self.cluster.next_action(slot)
        if isinstance(action, Execute):
            busy = any(s.busy for s in self.slots if s is not slot)
            t, shape = self.now, action.step.shape()  # once per step: it walks the batch
            for j, secs in enumerate(self.pricer.step_stages(slot.name, action.step, busy, shape)):
                t = free[j] = max(t, free[j]) + secs  # FIFO at every stage: steps never overtake
            if len(free) > 1:
                self.at(free[0], self._wake, slot)  # stage 1 can take the next step
            run = _Running(slot, action.step, self.pricer.phase(shape[0]), t)
            self._running.append(run)
            self.at(t, self._executed, run)
        elif action:  # pulls: they serialize on the pulling instance, bytes / link bandwidth each
            t = self.now
            for pull in action:
                t += self.pricer.pull_seconds(pull)
                self.at(t, self._pulled, pull)

    def _executed(self, run: _Running) -> None:
        if run.end > self.now:  # an arrival stalled it meanwhile
            self.at(run.end, self._executed, run)
            return
        self._running.remove(run)
        slot, step = run.slot, run.step
        sampled = [Sampled(r, 0) for r, n in step.items if r.num_computed + n >= r.num_tokens]
        self.cluster.executed(slot, step, sampled)
        self._wake(slot)

    def _pulled(self, pull: Pull) -> None:
        self.cluster.pulled(pull, self.pricer.pull_bytes(pull))
        if self.cluster.ready(pull.dst):
            self._wake(pull.dst)

    # ---- the Sink: SLO judgement as tokens and endings come ----
    def on_token(self, event: Token) -> str | None:
        r = event.req
        if len(r.output_ids) == 1 and self.judge[0] and self.slo and r.metrics.ttft > self.slo.ttft:
            self._fail(r)
        return None

    def on_finish(self, r: Request, reason: str) -> None:
        tpot = r.metrics.tpot
        if self.judge[1] and self.slo and tpot is not None and tpot > self.slo.tpot:
            self._fail(r)

    def _fail(self, r: Request) -> None:
        if r.id in self._failed:
            return
        self._failed.add(r.id)
        if self.max_failures is not None and len(self._failed) > self.max_failures:
            self._stopped = True

    def _stall(self) -> None:
        """A request arrives: each instance with steps in flight stalls for its front-end work (the longest
        stall of its steps' phases), its steps and busy stages shifted alike."""
        for slot in self.slots:
            runs = [x for x in self._running if x.slot is slot]
            secs = max((self.pricer.stall_seconds(x.phase) for x in runs), default=0.0)
            if not secs:
                continue
            for x in runs:
                x.end += secs
            free = self._stage_free[slot.name]
            free[:] = [f + secs if f > self.now else f for f in free]
            if len(free) > 1:
                self.at(free[0], self._wake, slot)

    # ---- running a workload ----
    def _arrive(self, r: Request) -> None:
        self._stall()
        if self.layout.mode != "decode":
            self.cluster.add(r)
            return
        r.num_computed = r.num_prompt  # prefilled elsewhere: first token at arrival
        r.output_ids.append(0)
        r.metrics.token_times.append(self.now)
        self.cluster.add_prefilled(r)
        if len(r.output_ids) >= r.params.max_tokens:
            self.cluster.finish(r, "length")

    def _check_fits(self, lengths: list[tuple[int, int]]) -> None:
        """A request larger than a pool would wait forever: refuse the layout instead."""
        longest_prompt = max(p for p, _ in lengths)
        longest = max(p + o for p, o in lengths)
        for s in self.slots:
            need = longest_prompt if s.role == "prefill" else longest
            if s.allocator.blocks_for(need) > s.allocator.num_blocks:
                raise ValueError(f"{s.name}: {s.allocator.num_blocks} KV blocks cannot hold a {need}-token request")

    def run(self, arrivals: list[float], lengths: list[tuple[int, int]]) -> SimResult:
        if len(arrivals) != len(lengths) or not lengths:
            raise ValueError("need one arrival time per (prompt_len, output_len), and at least one")
        self._check_fits(lengths)
        reqs = []
        for i, (t, (p, o)) in enumerate(zip(arrivals, lengths, strict=True)):
            r = Request(str(i), [0] * p, SamplingParams(max_tokens=o, ignore_eos=True), arrival=float(t))
            reqs.append(r)
            self.at(float(t), self._arrive, r)
        while self._heap and not self._stopped:
            self.now, _, fn, arg = heapq.heappop(self._heap)
            fn(arg)
        return SimResult([_result(r) for r in reqs], self.slo, self.judge, self.now, self._stopped)

    def check(self) -> None:
        """Allocator invariants of every pool (tests call it after a run)."""
        self.cluster.check()


def _result(r: Request) -> SimulatedRequest:
    m = r.metrics
    return SimulatedRequest(prompt_len=r.num_prompt, output_len=r.params.max_tokens, ttft=m.ttft,
                            tpot=m.tpot if r.finished else None, finished=r.finished, arrival=m.arrival,
                            prefill_start=m.prefill_start, transfer_time=m.transfer_time, preemptions=m.preemptions)


_RULE = StopRule()  # simulated requests stop on length alone (they run with ignore_eos, as DistServe's)


def simulate(profile: Profile, layout: Layout, arrivals: list[float], lengths: list[tuple[int, int]],
             slo: SLO | None = None, sched_config: SchedulerConfig | None = None,
             max_failures: int | None = None, seed: int = 0) -> SimResult:
    """Run one workload through one layout. Lengths are (prompt_len, output_len); arrivals in seconds;
    seed: of the step-noise draws, where the profile has step_noise."""
    sim = Simulation(profile, layout, sched_config or SchedulerConfig(), slo, max_failures, seed=seed)
    return sim.run(arrivals, lengths)
