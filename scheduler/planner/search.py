"""DistServe's placement search over a fixed cluster of N nodes x G devices.

- Algorithm 1 (high node affinity: hand-offs are cheap anywhere): each phase's layouts (tp, pp) are
  simulated alone (prefill judged on TTFT, decode on TPOT) for the goodput of one instance; a plan
  takes n prefill and m decode instances that fit the cluster, estimated at min(n*g_p, m*g_d) (the
  paper's n = ceil(R/g_p), m = ceil(R/g_d), read the other way round: the devices are given, the
  rate is what we maximize). The best estimates are then simulated together, hand-offs included,
  until no remaining estimate can beat the best joint result.
- Algorithm 2 (low node affinity: hand-offs stay inside a node): for each inter-node pipeline
  degree s, a unit spans s nodes; inside one node, enumerate prefill and decode segments that fill
  the node's G devices (an instance's stage j lives on node j of its unit, so its KV moves over the
  node's own links); simulate each unit jointly, best bound first; replicate the unit N/s times.
- Colocated baselines (prefill-first and chunked), replicated over the cluster, for comparison.
A layout's tp stays inside a node (tp <= G); pp may span nodes. Every goodput is per arrival draw of
the workload (goodput.Goodput: the median ranks, the range shows the spread over the draws).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from scheduler.planner.goodput import Goodput, Workload, goodput
from scheduler.planner.latency import Profile
from scheduler.planner.simulator import Layout, Parallel


@dataclass(frozen=True)
class Cluster:
    num_nodes: int
    devices_per_node: int

    def __post_init__(self) -> None:
        if self.num_nodes < 1 or self.devices_per_node < 1:
            raise ValueError(f"need at least one node and one device per node, got {self}")

    @property
    def devices(self) -> int:
        return self.num_nodes * self.devices_per_node


@dataclass
class Candidate:
    layout: Layout  # the whole plan; instance counts are totals
    result: Goodput  # req/s the plan sustains within the SLOs, per arrival draw
    method: str  # "joint": simulated as a whole | "phases": min of per-phase goodputs | "replicated"
    algorithm: str  # "alg1" | "alg2" | "colocated"
    unit: Layout | None = None  # Algorithm 2: the replicated unit
    nodes_per_unit: int = 1  # Algorithm 2: the inter-node pipeline degree s

    @property
    def goodput(self) -> float:
        """The median over the arrival draws: what ranks the candidate."""
        return self.result.median

    @property
    def per_device(self) -> float:
        return self.goodput / self.layout.devices

    def describe(self) -> str:
        lay = self.layout

        def p(x: Parallel) -> str:
            return f"{x.count}x(tp{x.tp},pp{x.pp})"
        if lay.mode == "colocated":
            return f"colocated{'-chunked' if lay.chunked else ''} {p(lay.colocated)}"
        return f"disagg P {p(lay.prefill)} + D {p(lay.decode)}"


class Planner:
    def __init__(self, profile: Profile, cluster: Cluster, work: Workload, rel_tol: float = 0.04,
                 max_joint: int = 6, max_tp: int | None = None, max_pp: int | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        self.profile = profile
        self.progress = progress  # told each goodput as it is found (the CLI prints them)
        self.t0 = time.perf_counter()
        self.max_tp = max_tp or cluster.devices_per_node  # tp stays inside a node
        self.max_pp = max_pp or cluster.devices
        self.cluster = cluster
        self.work = work
        self.rel_tol = rel_tol
        self.max_joint = max_joint  # joint simulations per algorithm at most (bounds the runtime)
        self._phase: dict[tuple[str, int, int], Goodput] = {}

    def layouts(self) -> list[tuple[int, int]]:
        return [(tp, pp) for tp, pp in self.profile.layouts(self.cluster.devices)
                if tp <= min(self.max_tp, self.cluster.devices_per_node) and pp <= self.max_pp]

    def phase_goodput(self, role: str, tp: int, pp: int) -> Goodput:
        """Goodput (req/s) of one instance running one phase alone."""
        key = (role, tp, pp)
        if key not in self._phase:
            spec = Parallel(tp, pp)
            lay = Layout("prefill", prefill=spec) if role == "prefill" else Layout("decode", decode=spec)
            self._phase[key] = goodput(self.profile, lay, self.work, rel_tol=self.rel_tol)
            self._tell(f"{role} alone, one tp{tp} pp{pp} instance", self._phase[key])
        return self._phase[key]

    def _joint(self, layout: Layout, hint: float) -> Goodput:
        g = goodput(self.profile, layout, self.work, hint=max(hint, 1e-3), rel_tol=self.rel_tol)
        self._tell(Candidate(layout, g, "joint", "").describe(), g)
        return g

    def _tell(self, what: str, g: Goodput) -> None:
        if self.progress is not None:
            self.progress(f"[{time.perf_counter() - self.t0:6.1f}s] {what}: {g} req/s")

    def algorithm1(self) -> list[Candidate]:
        total = self.cluster.devices
        lays = self.layouts()
        est: list[Candidate] = []
        for tp_p, pp_p in lays:
            gp = self.phase_goodput("prefill", tp_p, pp_p)
            for tp_d, pp_d in lays:
                gd = self.phase_goodput("decode", tp_d, pp_d)
                dp, dd = tp_p * pp_p, tp_d * pp_d
                for n in range(1, (total - dd) // dp + 1):
                    m = (total - n * dp) // dd  # fill the rest with decode instances
                    lay = Layout("disagg", prefill=Parallel(tp_p, pp_p, n), decode=Parallel(tp_d, pp_d, m))
                    est.append(Candidate(lay, gp.scaled(n).minimum(gd.scaled(m)), "phases", "alg1"))
        est.sort(key=lambda c: (-c.goodput, c.layout.devices))
        return self._verify(est)

    def _verify(self, ranked: list[Candidate]) -> list[Candidate]:
        """Simulate candidates jointly in order of their (optimistic) estimates; stop once the next
        estimate cannot beat the best joint goodput, or after max_joint runs."""
        out: list[Candidate] = []
        best = 0.0
        for c in ranked:
            if len(out) >= self.max_joint or c.goodput <= best * (1 + self.rel_tol) or c.goodput <= 0:
                break
            unit = c.unit or c.layout
            reps = c.layout.devices // unit.devices
            g = self._joint(unit, c.goodput / reps).scaled(reps)
            out.append(Candidate(c.layout, g, "joint", c.algorithm, c.unit, c.nodes_per_unit))
            best = max(best, g.median)
        seen = {id(c) for c in ranked[:len(out)]}
        out += [c for c in ranked if id(c) not in seen]  # the rest keep their estimates, for the listing
        return sorted(out, key=lambda c: (c.method != "joint", -c.goodput, c.layout.devices))

    def algorithm2(self) -> list[Candidate]:
        g, nodes = self.cluster.devices_per_node, self.cluster.num_nodes
        bounds: list[Candidate] = []
        for s in (s for s in range(1, nodes + 1) if nodes % s == 0):
            local = [(tp, pp // s) for tp, pp in self.layouts() if pp % s == 0 and tp * (pp // s) <= g]
            for tp_p, lp in local:
                for tp_d, ld in local:
                    dp, dd = tp_p * lp, tp_d * ld
                    for a in range(1, (g - dd) // dp + 1):
                        b = (g - a * dp) // dd
                        unit = Layout("disagg", prefill=Parallel(tp_p, lp * s, a), decode=Parallel(tp_d, ld * s, b))
                        reps = nodes // s
                        bound = self.phase_goodput("prefill", tp_p, lp * s).scaled(a * reps).minimum(
                            self.phase_goodput("decode", tp_d, ld * s).scaled(b * reps))
                        whole = Layout("disagg", prefill=Parallel(tp_p, lp * s, a * reps),
                                       decode=Parallel(tp_d, ld * s, b * reps))
                        bounds.append(Candidate(whole, bound, "phases", "alg2", unit, s))
        bounds.sort(key=lambda c: (-c.goodput, c.layout.devices))
        return self._verify(bounds)

    def colocated(self) -> list[Candidate]:
        """Replicas of one colocated layout over the cluster; the better of the two phases' goodputs
        alone bounds each (interference only lowers it), which orders and prunes the runs."""
        total = self.cluster.devices
        order = []
        for tp, pp in self.layouts():
            k = total // (tp * pp)
            bound = k * min(self.phase_goodput("prefill", tp, pp).median, self.phase_goodput("decode", tp, pp).median)
            order.append((bound, tp, pp, k))
        order.sort(reverse=True)
        out: list[Candidate] = []
        best = 0.0
        for bound, tp, pp, k in order:
            if bound <= best or bound <= 0:
                continue
            for chunked in (False, True):
                one = Layout("colocated", colocated=Parallel(tp, pp), chunked=chunked)
                g = self._joint(one, bound / k / 2).scaled(k)
                out.append(Candidate(Layout("colocated", colocated=Parallel(tp, pp, k), chunked=chunked), g,
                                     "replicated", "colocated"))
                best = max(best, g.median)
        return sorted(out, key=lambda c: -c.goodput)
