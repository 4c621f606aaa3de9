"""Goodput of one layout: the highest request rate at which the SLO attainment target still holds.

Every probe replays the same workload (lengths and unit-rate arrivals scaled by 1/rate: common random
numbers), so the attainment curve is a function of the rate alone and bisection is meaningful. The
search itself is goodput_search.py's, the one the load tester runs against real servers.

One arrival draw of a few hundred requests is not a basis for a ranking: on one layout, six seeds gave
goodputs 1.6x apart. A workload therefore carries several draws (seeds), the search runs once per draw
(each draw reused across its rates; the draws after the first start from the goodput found so far, in
small steps), and a layout's goodput is the median over the draws, reported with their range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.config import SchedulerConfig
from scheduler.planner.goodput_search import SearchConfig, find_goodput
from scheduler.planner.latency import Profile
from scheduler.planner.simulator import Layout, Parallel, Simulation
from scheduler.planner.workload import SLO


@dataclass
class Workload:
    lengths: list[tuple[int, int]]
    unit_arrivals: np.ndarray  # arrival times at 1 req/s: one draw [requests], or one per seed [seeds, requests]
    slo: SLO
    sched_config: SchedulerConfig

    def __post_init__(self) -> None:
        self.unit_arrivals = np.atleast_2d(np.asarray(self.unit_arrivals, dtype=float))
        if self.unit_arrivals.shape[1] != len(self.lengths) or not self.lengths:
            raise ValueError("need one unit arrival per request in every draw, and at least one request")

    @property
    def draws(self) -> int:
        return len(self.unit_arrivals)


@dataclass(frozen=True)
class Goodput:
    """A layout's goodput (req/s) under each arrival draw of a workload; the median ranks it."""

    per_draw: tuple[float, ...]

    @property
    def median(self) -> float:
        return float(np.median(self.per_draw))

    @property
    def low(self) -> float:
        return min(self.per_draw)

    @property
    def high(self) -> float:
        return max(self.per_draw)

    def scaled(self, k: float) -> Goodput:
        return Goodput(tuple(g * k for g in self.per_draw))

    def minimum(self, other: Goodput) -> Goodput:
        """Draw by draw: what two stages in series sustain (the draws are the same arrivals)."""
        return Goodput(tuple(min(a, b) for a, b in zip(self.per_draw, other.per_draw, strict=True)))

    def __str__(self) -> str:
        if len(self.per_draw) == 1:
            return f"{self.median:.3f}"
        return f"{self.median:.3f} [{self.low:.3f}-{self.high:.3f}]"


def attainment_at(profile: Profile, layout: Layout, work: Workload, rate: float, draw: int = 0) -> float:
    """Joint attainment at `rate` req/s under arrival draw `draw`; stops the run once the target is out of reach."""
    allowed = math.floor(len(work.lengths) * (1 - work.slo.attainment) + 1e-9)
    sim = Simulation(profile, layout, work.sched_config, work.slo, max_failures=allowed)
    return sim.run(list(work.unit_arrivals[draw] / rate), work.lengths).joint_attainment


def fits(profile: Profile, layout: Layout, work: Workload) -> bool:
    try:
        Simulation(profile, layout, work.sched_config)._check_fits(work.lengths)
    except ValueError:
        return False
    return True


def capacity(profile: Profile, layout: Layout, work: Workload) -> float:
    """Steady-state throughput (req/s) of a layout from the latency model at mean lengths: full
    prefill batches, and decode batches as large as the seats and the KV pool allow. A pipeline of pp
    stages starts a prefill batch every stage time, and keeps its decode seats in pp batches, each
    going round the pp stages once per token. A finite run above this rate can still look fine (its
    queue has not built up yet); goodput never exceeds it."""
    cfg = work.sched_config
    mean_in = float(np.mean([p for p, _ in work.lengths]))
    mean_out = float(np.mean([o for _, o in work.lengths]))

    def prefill_rate(spec: Parallel) -> float:
        k = max(1, min(cfg.max_prefill_seqs, int(cfg.max_prefill_tokens // mean_in)))
        return k / (profile.model_for(spec.tp, spec.pp).prefill_ms([round(mean_in)] * k) / 1e3)

    def decode_rate(spec: Parallel) -> float:
        ctx = mean_in + mean_out / 2
        b = max(1, min(cfg.max_num_seqs, int(profile.kv_capacity(spec.tp, spec.pp, "decode") // (ctx + 1))))
        per = max(1, b // spec.pp)  # one of the pp batches in flight
        round_trip = spec.pp * profile.model_for(spec.tp, spec.pp).decode_ms(round(per * ctx), per) / 1e3
        return b / round_trip / max(mean_out - 1, 1)

    if layout.mode == "prefill":
        return prefill_rate(layout.prefill) * layout.prefill.count
    if layout.mode == "decode":
        return decode_rate(layout.decode) * layout.decode.count
    if layout.mode == "disagg":
        return min(prefill_rate(layout.prefill) * layout.prefill.count,
                   decode_rate(layout.decode) * layout.decode.count)
    c = layout.colocated  # one device time-shares both phases
    return c.count / (1 / prefill_rate(c) + 1 / decode_rate(c))


def goodput(profile: Profile, layout: Layout, work: Workload, hint: float = 1.0, rel_tol: float = 0.04,
            min_rate: float = 1e-3) -> Goodput:
    """Highest rate (req/s, whole layout) with joint attainment >= the target, per arrival draw; 0 if none
    above min_rate or the layout cannot hold the longest request. `hint` is where the first draw's search
    starts; the layout's capacity caps it (goodput_search.py: doubling/halving to a bracket, then
    geometric bisection). Later draws start from the median so far and step by 1.25 to their bracket."""
    if not fits(profile, layout, work):
        return Goodput((0.0,) * work.draws)
    cap = capacity(profile, layout, work)
    found: list[float] = []
    for draw in range(work.draws):
        near = float(np.median(found)) if found and max(found) > 0 else None
        cfg = SearchConfig(target=work.slo.attainment, start_rate=min(max(near or hint, min_rate), cap),
                           rel_tol=rel_tol, max_iterations=None, max_seconds=math.inf, min_rate=min_rate,
                           max_rate=cap, growth=1.25 if near else 2.0)
        found.append(find_goodput(lambda rate, d=draw: attainment_at(profile, layout, work, rate, d), cfg).goodput)
    return Goodput(tuple(found))
