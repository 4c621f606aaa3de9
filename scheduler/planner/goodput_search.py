"""Goodput search: the highest request rate whose joint SLO attainment reaches the target.

One state machine (`GoodputSearch`: next_rate / record) drives every search: the planner's over a
simulator (scheduler/planner/goodput.py, sync `find_goodput`), the load tester's over real runs
(bench/loadgen.py, async `find_goodput_async`), and serving_compare's, seeded with a sweep:
  1. no bounds yet: double the rate while it passes (at most to max_rate), halve it while it fails
     (`growth`, 2 by default: a start from a good guess, as another seed's goodput, steps less);
  2. once a passing rate `lo` and a failing rate `hi` are known: bisect until hi - lo <= rel_tol * hi.
It stops early on the iteration, wall-time or request budget. Goodput = the highest measured rate
that passes with every lower measured rate (0 when none passed). Attainment is assumed to fall with
rate: the search's own probes lie between the bounds, and a noisy pass above a known failure (a
recorded sweep: passes at 0.5 and 1.5, fails at 1) does not count.

The midpoint is geometric, sqrt(lo * hi). The stopping rule is relative (hi - lo <= rel_tol * hi),
so what a probe must shrink is log(hi / lo), and the geometric midpoint halves it whatever the
bracket's width. The arithmetic midpoint does the same only for narrow brackets: on a wide one (a
sweep that passed at 0.1 and failed at 10, or a given lo/hi) it probes near the top, 5.05, and a
failure there leaves log(hi / lo) almost as wide as before. Inside the factor-2 bracket that doubling
or halving leaves, the two need the same number of probes (4 for rel_tol 0.05).
"""
from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

_EPS = 1e-9  # attainment is a share of requests: k/n compared with a target such as 0.9


@dataclass
class SearchConfig:
    target: float = 0.9  # joint attainment a rate must reach
    start_rate: float = 1.0  # first probe when no lower bound is given
    lo: float | None = None  # a rate believed to pass: probed first
    hi: float | None = None  # a rate taken as failing without a probe: caps the search
    rel_tol: float = 0.05
    max_iterations: int | None = 12  # None: no limit (a simulator's probes are cheap)
    max_seconds: float = 3600.0
    max_requests: int | None = None  # total over all probes
    requests_per_probe: int = 0  # used to predict a probe's length (N / rate) and its request cost
    min_rate: float = 1e-3
    max_rate: float = 1e6  # doubling stops here; a pass at max_rate ends the search with goodput max_rate
    growth: float = 2.0  # factor per step while no bracket is known

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise ValueError(f"attainment target must be in (0, 1], got {self.target}")
        if self.start_rate <= 0 or self.rel_tol <= 0:
            raise ValueError("start_rate and rel_tol must be > 0")
        if self.growth <= 1:
            raise ValueError(f"growth must be > 1, got {self.growth}")
        if self.lo is not None and self.hi is not None and not self.lo < self.hi:
            raise ValueError(f"need lo < hi, got {self.lo} >= {self.hi}")


@dataclass
class SearchResult:
    goodput: float
    history: list[tuple[float, float]] = field(default_factory=list)  # (rate, joint attainment)
    stop_reason: str = ""
    lo: float | None = None
    hi: float | None = None


class GoodputSearch:
    def __init__(self, cfg: SearchConfig) -> None:
        self.cfg = cfg
        self.lo: float | None = None  # highest measured passing rate
        self.hi: float | None = cfg.hi  # lowest failing rate (measured or given)
        self.history: list[tuple[float, float]] = []
        self.t0 = time.monotonic()
        self.stop_reason = ""

    def next_rate(self) -> float | None:
        """The next rate to probe, or None when the search is over (see stop_reason)."""
        c = self.cfg
        if not self.history:
            rate = c.lo if c.lo is not None else (c.hi / 2 if c.hi is not None else c.start_rate)
        elif self.lo is None:
            rate = self.hi / c.growth  # type: ignore[operator]  # every probe failed so far
            if rate < c.min_rate:
                return self._stop("no rate >= min_rate meets the target")
        elif self.hi is None:
            if self.lo >= c.max_rate:
                return self._stop("max_rate still meets the target")
            rate = min(self.lo * c.growth, c.max_rate)
        else:
            if self.hi - self.lo <= c.rel_tol * self.hi:
                return self._stop("converged")
            rate = math.sqrt(self.lo * self.hi)
        if c.max_iterations is not None and len(self.history) >= c.max_iterations:
            return self._stop("max iterations")
        elapsed = time.monotonic() - self.t0
        predicted = c.requests_per_probe / rate if c.requests_per_probe else 0.0
        if self.history and elapsed + predicted > c.max_seconds:
            return self._stop("max seconds")
        if c.max_requests is not None and (len(self.history) + 1) * c.requests_per_probe > c.max_requests:
            return self._stop("max requests")
        return rate

    def record(self, rate: float, joint_attainment: float) -> None:
        """lo: the highest passing rate below every failure (a pass above a failure -- run-to-run noise in
        a sweep recorded as a whole -- does not count: goodput is a rate that it and every lower rate meet)."""
        self.history.append((rate, joint_attainment))
        if joint_attainment < self.cfg.target - _EPS:
            self.hi = rate if self.hi is None else min(self.hi, rate)
        passing = [r for r, a in self.history if a >= self.cfg.target - _EPS and (self.hi is None or r < self.hi)]
        self.lo = max(passing) if passing else None

    def _stop(self, reason: str) -> None:
        self.stop_reason = reason
        return None

    def result(self) -> SearchResult:
        return SearchResult(self.lo or 0.0, list(self.history), self.stop_reason, self.lo, self.hi)


def find_goodput(measure: Callable[[float], float], cfg: SearchConfig) -> SearchResult:
    """Search with a synchronous measure(rate) -> joint attainment (e.g. a simulator)."""
    search = GoodputSearch(cfg)
    while (rate := search.next_rate()) is not None:
        search.record(rate, measure(rate))
    return search.result()


async def find_goodput_async(measure: Callable[[float], Awaitable[float]], cfg: SearchConfig) -> SearchResult:
    """Search with an async measure(rate) -> joint attainment (e.g. a real load run)."""
    search = GoodputSearch(cfg)
    while (rate := search.next_rate()) is not None:
        search.record(rate, await measure(rate))
    return search.result()
