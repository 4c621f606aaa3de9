"""Discrete-event simulation of a serving layout, driving the runtime policies (scheduler/prefill.py,
decode.py, colocated.py) over simulated time.

Modes:
- disagg: prefill instances -> KV hand-off -> decode instances. New requests go to the least-loaded
  prefill instance, prefilled ones to the least-loaded decode instance (`.load` of each policy).
  The decode side pulls; copies serialize on the pulling decode instance (bytes / link bandwidth),
  before its next step, and the prefill side frees its blocks when the copy lands.
- colocated: one pool per instance, prefill-first or chunked.
- prefill / decode: one phase alone, for Algorithm 1's independent search. "prefill": KV leaves the
  instance the moment its prefill ends (only TTFT is judged). "decode": requests arrive prefilled,
  first token at arrival (only TPOT is judged).
"""
from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.config import SamplingParams, SchedulerConfig
from engine.request import Request, Status
from scheduler.latency import Profile
from scheduler.sim_instances import ColocatedInstance, DecodeInstance, PrefillInstance
from scheduler.workload import SLO

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


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int
    arrival: float
    ttft: float | None  # None: no first token (the run stopped early)
    tpot: float | None  # None: one output token, or unfinished
    finished: bool
    prefill_start: float | None = None
    transfer_time: float | None = None
    preemptions: int = 0


@dataclass
class SimResult:
    requests: list[RequestResult]
    slo: SLO | None
    judged: tuple[bool, bool]  # (ttft, tpot) judged in this mode
    duration: float
    stopped_early: bool = False

    def _ok(self, r: RequestResult, ttft: bool, tpot: bool) -> bool:
        if self.slo is None:
            raise ValueError("attainment needs an SLO")
        if ttft and self.judged[0] and (r.ttft is None or r.ttft > self.slo.ttft):
            return False
        if tpot and self.judged[1] and (not r.finished or (r.tpot is not None and r.tpot > self.slo.tpot)):
            return False
        return True

    def attainment(self, ttft: bool = True, tpot: bool = True) -> float:
        return sum(self._ok(r, ttft, tpot) for r in self.requests) / len(self.requests)

    @property
    def joint_attainment(self) -> float:
        return self.attainment(True, True)


@dataclass
class Simulation:
    profile: Profile
    layout: Layout
    sched_config: SchedulerConfig
    slo: SLO | None = None
    max_failures: int | None = None  # stop once this many requests are sure to miss (bisection speed-up)
    now: float = 0.0
    prefills: list[Any] = field(default_factory=list)  # PrefillInstance | ColocatedInstance
    decodes: list[DecodeInstance] = field(default_factory=list)
    _heap: list = field(default_factory=list)
    _seq: int = 0
    _failed: set[str] = field(default_factory=set)
    _stopped: bool = False

    def __post_init__(self) -> None:
        lay, prof = self.layout, self.profile
        self.judge = (lay.mode != "decode", lay.mode != "prefill")
        for role, spec in (("prefill", lay.prefill), ("decode", lay.decode), ("colocated", lay.colocated)):
            if spec is None:
                continue
            cap = prof.kv_capacity(spec.tp, spec.pp)
            if spec.tp not in prof.tp or not cap:
                raise ValueError(f"profile has no tp={spec.tp} pp={spec.pp} layout")
            for i in range(spec.count):
                model = prof.model_for(spec.tp, spec.pp)
                if role == "prefill":
                    self.prefills.append(PrefillInstance(self, f"prefill{i}", model, cap))
                elif role == "decode":
                    self.decodes.append(DecodeInstance(self, f"decode{i}", model, cap))
                else:
                    self.prefills.append(ColocatedInstance(self, f"colocated{i}", model, cap, lay.chunked))

    # ---- the event heap ----
    def at(self, t: float, fn: Callable, arg: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, arg))

    # ---- request lifecycle, called by the instances ----
    def first_token(self, r: Request) -> None:
        if self.judge[0] and self.slo and r.metrics.ttft > self.slo.ttft:
            self._fail(r)

    def hand_off(self, r: Request) -> None:
        if self.layout.mode == "prefill":  # phase alone: the KV leaves at once
            r.instance.alloc.free(r.block_table)
            self.finish(r)
            return
        dec = min(self.decodes, key=lambda d: d.sched.load)
        dec.sched.add(r)
        dec.kick()

    def finish(self, r: Request) -> None:
        r.status = Status.FINISHED
        r.metrics.finish = self.now
        tpot = r.metrics.tpot
        if self.judge[1] and self.slo and tpot is not None and tpot > self.slo.tpot:
            self._fail(r)

    def _fail(self, r: Request) -> None:
        if r.id in self._failed:
            return
        self._failed.add(r.id)
        if self.max_failures is not None and len(self._failed) > self.max_failures:
            self._stopped = True

    def _arrive(self, r: Request) -> None:
        if self.layout.mode == "decode":
            r.num_computed = r.num_prompt
            r.output_ids.append(0)
            r.metrics.token_times.append(self.now)
            if len(r.output_ids) >= r.params.max_tokens:
                self.finish(r)
                return
            self.hand_off(r)
            return
        inst = min(self.prefills, key=lambda p: p.sched.load)
        inst.sched.add(r)
        inst.kick()

    def _check_fits(self, lengths: list[tuple[int, int]]) -> None:
        """A request larger than a pool would wait forever: refuse the layout instead."""
        longest_prompt = max(p for p, _ in lengths)
        longest = max(p + o for p, o in lengths)
        for inst in self.prefills:
            need = longest if isinstance(inst, ColocatedInstance) else longest_prompt
            if inst.alloc.blocks_for(need) > inst.alloc.num_blocks:
                raise ValueError(f"{inst.name}: {inst.alloc.num_blocks} KV blocks cannot hold a {need}-token request")
        for inst in self.decodes:
            if inst.alloc.blocks_for(longest) > inst.alloc.num_blocks:
                raise ValueError(f"{inst.name}: {inst.alloc.num_blocks} KV blocks cannot hold a {longest}-token "
                                 "request")

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
        return SimResult([RequestResult(r.num_prompt, r.params.max_tokens, r.metrics.arrival, r.metrics.ttft,
                                        r.metrics.tpot if r.finished else None, r.finished,
                                        r.metrics.prefill_start, r.metrics.transfer_time, r.metrics.preemptions)
                          for r in reqs],
                         self.slo, self.judge, self.now, self._stopped)

    def check(self) -> None:
        """Allocator invariants of every pool (tests call it after a run)."""
        for inst in self.prefills + self.decodes:
            inst.alloc.check()


def simulate(profile: Profile, layout: Layout, arrivals: list[float], lengths: list[tuple[int, int]],
             slo: SLO | None = None, sched_config: SchedulerConfig | None = None,
             max_failures: int | None = None) -> SimResult:
    """Run one workload through one layout. Lengths are (prompt_len, output_len); arrivals in seconds."""
    sim = Simulation(profile, layout, sched_config or SchedulerConfig(), slo, max_failures)
    return sim.run(arrivals, lengths)
