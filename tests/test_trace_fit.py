"""Fitting the latency model to a server's step trace (scheduler/trace_fit.py), on synthetic traces
whose true coefficients and interference are known."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from scheduler.planner.latency import LatencyModel, PhaseCoeffs
from scheduler.planner.trace_fit import fit_trace, model_ratios, residuals, samples
from scheduler.runtime.trace import StepRecord

TRUE = PhaseCoeffs((20.0, 0.5, 0.001), (30.0, 0.002, 4.0), (30.0, 0.002, 4.0), threshold=95)


def trace(busy_factor: float, seed: int = 0, n: int = 60) -> list[StepRecord]:
    """Prefill steps on "prefill0", decode steps on "decode1"; steps started next to a busy neighbor
    take busy_factor x as long."""
    rng, model, t, out = random.Random(seed), LatencyModel(TRUE), 0.0, []
    for i in range(n):
        busy = i % 2 == 1
        k = busy_factor if busy else 1.0
        lens = [rng.randint(16, 256) for _ in range(rng.randint(1, 4))]
        ms = model.prefill_ms(lens) * k
        out.append(StepRecord("prefill0", "prefill", t, [(x, 0) for x in lens], 0, 0, 0, busy, t + ms / 1e3))
        b = rng.randint(1, 32)
        ctx = b * rng.randint(32, 300)
        ms = model.decode_ms(ctx, b) * k
        out.append(StepRecord("decode1", "decode", t, [], ctx, b, 0, busy, t + ms / 1e3))
        t += 1.0
    return out


def test_recovers_the_coefficients_of_an_exact_trace():
    coeffs, factors, report = fit_trace(trace(1.0), thresholds=(95,))
    for got, want in ((coeffs.prefill, TRUE.prefill), (coeffs.decode_small, TRUE.decode_small)):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert factors == pytest.approx({"prefill": 1.0, "decode": 1.0})
    assert report["samples"] == {"prefill": 60, "decode": 60}


def test_splits_interference_out_of_the_steps_that_ran_next_to_a_busy_instance():
    coeffs, factors, _ = fit_trace(trace(1.5), thresholds=(95,))
    assert factors["prefill"] == pytest.approx(1.5, rel=0.02)
    assert factors["decode"] == pytest.approx(1.5, rel=0.02)
    model, truth = LatencyModel(coeffs), LatencyModel(TRUE)  # scaled back to a step running alone
    for lens in ([16], [128, 64], [256] * 4):
        assert model.prefill_ms(lens) == pytest.approx(truth.prefill_ms(lens), rel=0.05)
    for ctx, b in ((40, 1), (3000, 16), (9000, 32)):
        assert model.decode_ms(ctx, b) == pytest.approx(truth.decode_ms(ctx, b), rel=0.05)


def test_only_steps_the_formulas_describe_are_samples():
    def rec(prefill, ctx, batch, role="colocated", end=0.01):
        return StepRecord("c0", role, 0.0, prefill, ctx, batch, 0, False, end)
    recs = [
        rec([(64, 0)], 0, 0),  # prefill
        rec([], 300, 3),  # decode
        rec([(64, 128)], 0, 0),  # a later chunk: no
        rec([(32, 0)], 100, 1),  # mixed: no
        rec([(8, 0)], 0, 0, role="prefill"),  # other role
        rec([], 5, 1, end=None),  # never ended
    ]
    pre, dec = samples(recs, ("colocated",))
    assert pre == [([64], pytest.approx(10.0), False)]
    assert dec == [(300, 3, pytest.approx(10.0), False)]
    with pytest.raises(ValueError, match="need >= 3"):
        fit_trace(recs, ("colocated",))


def test_model_ratios_are_one_on_the_trace_the_model_came_from_and_show_a_slowdown():
    coeffs, factors, _ = fit_trace(trace(1.5), thresholds=(95,))
    model = LatencyModel(coeffs)
    r = model_ratios(trace(1.5, seed=1), model, factors, ("prefill", "decode"))
    assert r == pytest.approx({"prefill": 1.0, "decode": 1.0}, rel=0.02)
    slower = [replace(x, end=x.start + 1.2 * (x.end - x.start)) for x in trace(1.5, seed=2)]
    assert model_ratios(slower, model, factors, ("prefill", "decode")) == pytest.approx(
        {"prefill": 1.2, "decode": 1.2}, rel=0.02)
    assert model_ratios([], model, factors, ("decode",)) == {"prefill": None, "decode": None}


def test_residuals_are_each_steps_measured_over_modelled_time():
    """What the fidelity bench hands the simulator as step noise: one ratio per usable step, busy-neighbor
    steps measured against their factor."""
    coeffs, factors, _ = fit_trace(trace(1.5), thresholds=(95,))
    model = LatencyModel(coeffs)
    steps = trace(1.5, seed=3)
    steps = [replace(x, end=x.start + (0.8 if i % 4 < 2 else 1.2) * (x.end - x.start)) for i, x in enumerate(steps)]
    res = residuals(steps, model, factors, ("prefill", "decode"))
    assert len(res["prefill"]) == len(res["decode"]) == 60
    assert sorted({round(x, 2) for x in res["prefill"] + res["decode"]}) == [0.8, 1.2]
    assert residuals(steps, model, factors, ("decode",))["prefill"] == []


def test_interference_settles_when_almost_every_step_had_a_busy_neighbor():
    """A loaded disaggregated server: ~10% of steps start alone. The fit must still find the factor."""
    recs = trace(1.5, n=150)
    for i, r in enumerate(recs):
        was_busy = (i // 2) % 2 == 1  # trace() slowed the odd step pairs by 1.5
        r.others_busy = i % 20 >= 2  # 2 alone in every 20 steps
        k = (1.5 if r.others_busy else 1.0) / (1.5 if was_busy else 1.0)
        r.end = r.start + k * (r.end - r.start)
    coeffs, factors, report = fit_trace(recs, thresholds=(95,))
    assert factors == pytest.approx({"prefill": 1.5, "decode": 1.5}, rel=0.01)
    assert LatencyModel(coeffs).decode_ms(3000, 16) == pytest.approx(LatencyModel(TRUE).decode_ms(3000, 16), rel=0.01)
    assert report["rounds"] > 6


def test_steps_that_swapped_kv_are_not_samples():
    recs = trace(1.0)[:6]
    for r in recs:
        r.swap_tokens = 32
    assert samples(recs, ("prefill", "decode")) == ([], [])
