"""Fit the latency model to a running server's step trace (scheduler/runtime/trace.py) instead of steps
timed in isolation: the iteration times then carry what serving adds (the event loop's HTTP and
token work on the same cores, the GIL shared with the other instance, the gap before the next step).

    fit = fit_trace(records, roles=("decode",))   # fit.coeffs, fit.interference, fit.arrival_stall_ms

Prefill samples are steps with prompt chunks that start at token 0 and no decodes (a chunk after
cached tokens, or a mixed chunked step, does not fit DistServe's prefill formula); decode samples are
steps without prompt chunks; steps that swapped KV are left out. Two effects of serving are split out
of the step times alongside the coefficients, per phase:
- interference: steps that started while another instance was busy are slower by a factor
  (Profile.interference); with fewer than MIN_SPLIT steps on either side the factor is 1;
- arrival stall: each request that arrived while the step ran adds a fixed time (the front end's work
  on the event loop competes for the GIL and the cores: Profile.arrival_stall_ms); with fewer than
  MIN_SPLIT steps that saw an arrival it is 0.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

from scheduler.planner.latency import LatencyModel, PhaseCoeffs
from scheduler.planner.profile import DECODE_THRESHOLDS, fit_decode_threshold
from scheduler.runtime.trace import StepRecord

MIN_SPLIT = 5
NEIGHBORS = 2  # steps on either side that a step's arrival stall is measured against
# A step the stall fit misses by more than this many robust standard deviations (1.4826 x the median absolute
# deviation) is left out of the refit: on a shared machine a few steps stretched by something else (another
# process, a page fault storm) and landing beside an arrival would otherwise be read as the arrivals' cost.
OUTLIER_MADS = 3.0
PP1_HOP_MS = 1.0  # what LatencyModel.prefill_ms adds at pp=1
PHASES = ("prefill", "decode")


@dataclass
class TraceFit:
    coeffs: PhaseCoeffs  # of a step that starts alone, with no arrival while it runs
    interference: dict[str, float]  # phase -> factor (Profile.interference)
    arrival_stall_ms: dict[str, float]  # phase -> ms per arrival during the step (Profile.arrival_stall_ms)
    report: dict  # samples, fit errors, rounds


@dataclass(frozen=True)
class Observed:
    """One traced step against the model: measured ms, the model's ms alone, busy neighbor, arrivals."""

    ms: float
    model_ms: float
    busy: bool
    arrivals: int


def samples(records: list[StepRecord], roles: tuple[str, ...]) -> tuple[list, list]:
    """(prefill samples [(lengths, ms, others_busy, arrivals)], decode samples [(ctx, batch, ms, others_busy,
    arrivals)])."""
    pre, dec = [], []
    for r in records:
        if r.role not in roles or r.end is None or r.swap_tokens:
            continue  # a step that also copied KV to / from the host: the simulator prices copies apart
        if r.prefill and not r.decode_batch and all(c == 0 for _, c in r.prefill):
            pre.append(([n for n, _ in r.prefill], r.ms, r.others_busy, r.arrivals))
        elif not r.prefill and r.decode_batch:
            dec.append((r.decode_ctx, r.decode_batch, r.ms, r.others_busy, r.arrivals))
    return pre, dec


def _observed(model: LatencyModel, pre: list, dec: list) -> dict[str, list[Observed]]:
    return {"prefill": [Observed(t, model.prefill_ms(ls), b, n) for ls, t, b, n in pre],
            "decode": [Observed(t, model.decode_ms(s, k), b, n) for s, k, t, b, n in dec]}


def _factor(obs: list[Observed], stall: float) -> float:
    """Median over the busy-neighbor steps of (measured - arrivals' stall) / model (1 if too few either side)."""
    busy = [(o.ms - stall * o.arrivals) / o.model_ms for o in obs if o.busy and o.model_ms > 0]
    if len(busy) < MIN_SPLIT or len(obs) - len(busy) < MIN_SPLIT:
        return 1.0
    return statistics.median(busy)


def _stall(obs: list[Observed], factor: float) -> float:
    """ms per arrival. A step runs speed x its priced time + stall x its arrivals, and this shared machine's
    speed drifts over seconds: a fit across runs at different rates would read a slower run's drift as the
    cost of its extra arrivals. So, per step (obs in time order), measured / priced against arrivals / priced
    (the stall) and 1 / priced (a constant the formula misprices, which would otherwise pass for a stall:
    short steps have more arrivals per ms), each relative to the NEIGHBORS steps on either side; the stall is
    the least-squares coefficient of the first, refitted without the steps beyond OUTLIER_MADS. 0 with fewer
    than MIN_SPLIT steps that saw an arrival; never negative."""
    if sum(o.arrivals > 0 for o in obs) < MIN_SPLIT:
        return 0.0
    priced = np.array([o.model_ms * (factor if o.busy else 1.0) for o in obs])
    ms, arrivals = np.array([o.ms for o in obs]), np.array([o.arrivals for o in obs], dtype=float)
    keep = np.ones(len(obs), dtype=bool)
    for _ in range(5):  # least squares, then again on the steps it did not miss far, until that set settles
        p, a = priced[keep], arrivals[keep]  # each kept step against its kept neighbours
        x = np.column_stack([_detrended(a / p), _detrended(1.0 / p)])
        y = _detrended(ms[keep] / p)
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        err = y - x @ coef
        dev = np.abs(err - np.median(err))
        near = dev <= OUTLIER_MADS * 1.4826 * np.median(dev)
        if near.all() or near.sum() < MIN_SPLIT or (a[near] > 0).sum() < MIN_SPLIT:
            break
        keep[np.flatnonzero(keep)[~near]] = False
    return max(0.0, float(coef[0]))


def _detrended(v: np.ndarray) -> np.ndarray:
    """Each value minus the mean of its NEIGHBORS neighbors on either side (fewer at the ends)."""
    k = np.ones(2 * NEIGHBORS + 1)
    k[NEIGHBORS] = 0.0
    return v - np.convolve(v, k, "same") / np.convolve(np.ones_like(v), k, "same")


# An instance next to a busy one ran ~1.2x slower here (bench/RESULTS.md); a fit that settles beyond this
# many times either way has found a degenerate fixed point of its loop (seen on traces of a machine running
# 2.4-3.6x slower than usual), and fit_trace says so rather than hand it to a simulator.
MAX_FACTOR = 4.0


def fit_trace(records: list[StepRecord], roles: tuple[str, ...] = ("prefill", "decode", "colocated"),
              thresholds: tuple[int, ...] = DECODE_THRESHOLDS, tol: float = 1e-4, max_rounds: int = 200) -> TraceFit:
    """The model for the instances of `roles` (one device kind and size), its interference factors and
    arrival stalls.

    Alternates until the factors and stalls settle (within `tol`, relative; stalls within tol ms): fit the
    formulas to the steps with each arrival's stall taken off and busy-neighbor steps divided by their
    phase's factor; re-estimate each factor as the median of (observed - stall) / fitted over the
    busy-neighbor steps, then each stall from what the steps ran beyond their priced time. Each round
    closes about the alone steps' share of the remaining gap, so a trace that is mostly busy-neighbor
    steps needs many rounds. ValueError when too few steps are usable or the factors settle beyond
    MAX_FACTOR (callers fall back to an isolated profile)."""
    pre, dec = samples(sorted(records, key=lambda r: r.start), roles)  # time order: _stall compares neighbors
    if len(pre) < 3 or len(dec) < 3:
        raise ValueError(f"step trace has {len(pre)} prefill and {len(dec)} decode steps usable: need >= 3 of each")
    factors = {p: 1.0 for p in PHASES}
    stalls = {p: 0.0 for p in PHASES}
    rounds = 0
    while rounds < max_rounds:
        rounds += 1
        (fp, fd), (sp, sd) = (factors[p] for p in PHASES), (stalls[p] for p in PHASES)
        # LatencyModel adds the pp=1 stage hop (1 ms) to every prefill: fit what is left of a step
        coeffs, report = fit_decode_threshold(
            [(ls, (t - sp * n) / (fp if b else 1.0) - PP1_HOP_MS) for ls, t, b, n in pre],
            [(s, k, (t - sd * n) / (fd if b else 1.0)) for s, k, t, b, n in dec], thresholds)
        obs = _observed(LatencyModel(coeffs), pre, dec)
        old = factors, stalls
        factors = {p: _factor(obs[p], stalls[p]) for p in PHASES}
        stalls = {p: _stall(obs[p], factors[p]) for p in PHASES}
        if all(abs(factors[p] - old[0][p]) <= tol * old[0][p] and abs(stalls[p] - old[1][p]) <= tol for p in PHASES):
            break
    bad = {p: round(f, 2) for p, f in factors.items() if not 1 / MAX_FACTOR <= f <= MAX_FACTOR}
    if bad:  # e.g. coefficients near 0 and a factor in the hundreds: a fixed point, not a machine
        raise ValueError(f"degenerate fit: interference factors {bad} outside [1/{MAX_FACTOR}, {MAX_FACTOR}]")
    report["rounds"] = rounds
    report["samples"] = {"prefill": len(pre), "decode": len(dec)}
    report["busy_neighbor_steps"] = {"prefill": sum(x[2] for x in pre), "decode": sum(x[3] for x in dec)}
    report["steps_with_arrivals"] = {"prefill": sum(x[3] > 0 for x in pre), "decode": sum(x[4] > 0 for x in dec)}
    return TraceFit(coeffs, factors, stalls, report)


def residuals(records: list[StepRecord], model: LatencyModel, factors: dict[str, float],
              roles: tuple[str, ...], stalls: dict[str, float] | None = None) -> dict[str, list[float]]:
    """Per phase, (observed - arrivals' stall) / predicted time of each step of a trace (busy-neighbor steps
    predicted with their factor): the model's error on those steps, and the step-time noise a simulator can
    draw from (Profile.step_noise), which multiplies the modelled time before any stall is added. A
    deterministic simulator prices every step at the model's mean, and a queue fed by steps that vary waits
    longer than one fed by steps that do not."""
    stalls = stalls or {}
    pre, dec = samples(records, roles)
    out = {}
    for phase, obs in _observed(model, pre, dec).items():
        f, s = factors.get(phase, 1.0), stalls.get(phase, 0.0)
        out[phase] = [(o.ms - s * o.arrivals) / (o.model_ms * (f if o.busy else 1.0)) for o in obs if o.model_ms > 0]
    return out


def model_ratios(records: list[StepRecord], model: LatencyModel, factors: dict[str, float],
                 roles: tuple[str, ...], stalls: dict[str, float] | None = None) -> dict[str, float | None]:
    """Mean residual per phase over a trace (1.00: the model prices what ran right). None: no such steps."""
    return {phase: statistics.fmean(r) if r else None
            for phase, r in residuals(records, model, factors, roles, stalls).items()}
