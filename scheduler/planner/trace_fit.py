"""Fit the latency model to a running server's step trace (scheduler/runtime/trace.py) instead of steps
timed in isolation: the iteration times then carry what serving adds (the event loop's HTTP and
token work on the same cores, the GIL shared with the other instance, the gap before the next step).

    coeffs, factors, report = fit_trace(records, roles=("decode",))

Prefill samples are steps with prompt chunks that start at token 0 and no decodes (a chunk after
cached tokens, or a mixed chunked step, does not fit DistServe's prefill formula); decode samples are
steps without prompt chunks; steps that swapped KV are left out. Interference: steps that started
while another instance was busy are slower by a per-phase factor (Profile.interference) that the
fit estimates alongside the coefficients; with fewer than MIN_SPLIT steps on either side the factor
is 1 (nothing to tell apart).
"""
from __future__ import annotations

import statistics

from scheduler.planner.latency import LatencyModel, PhaseCoeffs
from scheduler.planner.profile import DECODE_THRESHOLDS, fit_decode_threshold
from scheduler.runtime.trace import StepRecord

MIN_SPLIT = 5
PP1_HOP_MS = 1.0  # what LatencyModel.prefill_ms adds at pp=1


def samples(records: list[StepRecord], roles: tuple[str, ...]) -> tuple[list, list]:
    """(prefill samples [(lengths, ms, others_busy)], decode samples [(ctx, batch, ms, others_busy)])."""
    pre, dec = [], []
    for r in records:
        if r.role not in roles or r.end is None or r.swap_tokens:
            continue  # a step that also copied KV to / from the host: the simulator prices copies apart
        if r.prefill and not r.decode_batch and all(c == 0 for _, c in r.prefill):
            pre.append(([n for n, _ in r.prefill], r.ms, r.others_busy))
        elif not r.prefill and r.decode_batch:
            dec.append((r.decode_ctx, r.decode_batch, r.ms, r.others_busy))
    return pre, dec


def _factor(observed: list[tuple[float, float, bool]]) -> float:
    """observed: (measured ms, alone-model ms, others_busy) -> median busy ratio (1 if too few either side)."""
    busy = [m / f for m, f, b in observed if b and f > 0]
    if len(busy) < MIN_SPLIT or len(observed) - len(busy) < MIN_SPLIT:
        return 1.0
    return statistics.median(busy)


def _priced(model: LatencyModel, pre: list, dec: list) -> dict[str, list[tuple[float, float, bool]]]:
    """Per phase: (measured ms, the model's ms for that step alone, others_busy) of each sample."""
    return {"prefill": [(t, model.prefill_ms(ls), b) for ls, t, b in pre],
            "decode": [(t, model.decode_ms(s, n), b) for s, n, t, b in dec]}


def fit_trace(records: list[StepRecord], roles: tuple[str, ...] = ("prefill", "decode", "colocated"),
              thresholds: tuple[int, ...] = DECODE_THRESHOLDS, tol: float = 1e-4,
              max_rounds: int = 200) -> tuple[PhaseCoeffs, dict[str, float], dict]:
    """Coefficients (of a step that starts alone) for the instances of `roles` (one device kind and
    size), interference factors {"prefill", "decode"}, and a report (samples, fit errors, rounds).

    Alternates until the factors settle (within `tol`): fit the formulas to the steps with
    busy-neighbor steps divided by their phase's factor; re-estimate each factor as the median of
    observed / fitted over the busy-neighbor steps. Each round closes about the alone steps' share of
    the remaining gap, so a trace that is mostly busy-neighbor steps needs many rounds."""
    pre, dec = samples(records, roles)
    if len(pre) < 3 or len(dec) < 3:
        raise ValueError(f"step trace has {len(pre)} prefill and {len(dec)} decode steps usable: need >= 3 of each")
    factors = {"prefill": 1.0, "decode": 1.0}
    rounds = 0
    while rounds < max_rounds:
        rounds += 1
        fp, fd = factors["prefill"], factors["decode"]
        # LatencyModel adds the pp=1 stage hop (1 ms) to every prefill: fit what is left of a step
        coeffs, report = fit_decode_threshold([(ls, (t / fp if b else t) - PP1_HOP_MS) for ls, t, b in pre],
                                              [(s, n, t / fd if b else t) for s, n, t, b in dec], thresholds)
        factors = {phase: _factor(obs) for phase, obs in _priced(LatencyModel(coeffs), pre, dec).items()}
        if abs(factors["prefill"] - fp) <= tol * fp and abs(factors["decode"] - fd) <= tol * fd:
            break
    report["rounds"] = rounds
    report["samples"] = {"prefill": len(pre), "decode": len(dec)}
    report["busy_neighbor_steps"] = {"prefill": sum(b for *_, b in pre), "decode": sum(b for *_, b in dec)}
    return coeffs, factors, report


def residuals(records: list[StepRecord], model: LatencyModel, factors: dict[str, float],
              roles: tuple[str, ...]) -> dict[str, list[float]]:
    """Per phase, observed / predicted time of each step of a trace (busy-neighbor steps predicted with
    their factor): the model's error on those steps, and the step-time noise a simulator can draw from
    (Profile.step_noise). A deterministic simulator prices every step at the model's mean, and a queue fed
    by steps that vary waits longer than one fed by steps that do not."""
    pre, dec = samples(records, roles)
    return {phase: [m / (f * (factors.get(phase, 1.0) if b else 1.0)) for m, f, b in obs if f > 0]
            for phase, obs in _priced(model, pre, dec).items()}


def model_ratios(records: list[StepRecord], model: LatencyModel, factors: dict[str, float],
                 roles: tuple[str, ...]) -> dict[str, float | None]:
    """Mean observed / predicted step time per phase over a trace. None: no such steps."""
    return {phase: statistics.fmean(r) if r else None for phase, r in residuals(records, model, factors, roles).items()}
