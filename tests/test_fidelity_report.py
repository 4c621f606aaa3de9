"""The simulator-fidelity bar (bench/fidelity_report.py): the simulator is held to the real server's own
run-to-run spread, never tighter than 2 points, by a model that never saw the steps it is judged against."""
from __future__ import annotations

import pytest

from bench.fidelity_report import markdown, noise_band, verdict


def test_the_bar_is_the_real_spread_or_two_points():
    # three real runs 53.3 / 65.0 / 60.0: mean 59.43, spread 11.7 -> a simulated 50.0 is within it
    band = noise_band([53.3, 65.0, 60.0], 50.0)
    assert band["real_both"] == pytest.approx(59.433, abs=1e-3) and band["real_spread"] == pytest.approx(11.7)
    assert band["diff"] == pytest.approx(-9.433, abs=1e-3) and band["met"]
    assert not noise_band([53.3, 65.0, 60.0], 47.0)["met"]
    # real runs that agree: the bar is 2 points, not their 0.5
    tight = noise_band([80.0, 80.5, 80.0], 82.0)
    assert tight["bar"] == 2.0 and tight["met"] and not noise_band([80.0, 80.5, 80.0], 82.5)["met"]


def test_the_report_names_the_rates_that_miss():
    def row(rate, runs, sim):
        r = {"rate": rate, "load": 0.5, "real_ttft": 0.0, "real_tpot": 0.0, "real_both_runs": runs,
             "sim_ttft": 0.0, "sim_tpot": 0.0, "sim_both": sim, "iso_both": sim, "real_ttft_mean_ms": 1.0,
             "sim_ttft_mean_ms": 1.0, "real_tpot_mean_ms": 1.0, "sim_tpot_mean_ms": 1.0, "step_ratio": {}}
        r |= noise_band(runs, sim)
        return r | {"iso_diff": r["diff"]}
    mode = {"mode": "disagg", "rows": [row(1.0, [90.0, 92.0, 91.0], 91.5), row(2.0, [40.0, 44.0, 42.0], 50.0)],
            "calibration": {"ttft_s": 0.1, "tpot_s": 0.01, "front_end_ttft_ms": 2.0, "overhead_prefill_ms": 1.0,
                            "overhead_decode_ms": 1.0}, "slo": {"ttft": 0.3, "tpot": 0.03},
            "in_server_fit": {"rates": [0.5], "per_rate": [
                {"rate": 1.0, "coeffs": None, "fit": {"error": "too few steps", "samples": None}},
                {"rate": 2.0, "coeffs": {}, "interference": {}, "arrival_stall_ms": {"decode": 2.0},
                 "fit": {"samples": 700}}]}}
    doc = {"date": "today", "command": "x", "workload": "w", "repeats": 3, "slo_scale": 3.0, "interference": {},
           "modes": [mode]}
    assert verdict(doc).startswith("1/2 rows within max(2 points, the real spread); 1/2 within 2 points")
    assert "disagg 2 req/s (+8.0 pts, bar 4.0)" in verdict(doc)
    text = markdown(doc)
    assert "| 90.0, 92.0, 91.0 | 2.0 |" in text and "| NO |" in text
    assert "at 1.0 req/s not fitted (too few steps)" in text and "at 2.0 req/s fitted to 700 traced steps" in text


def test_a_rates_model_is_fitted_without_that_rates_own_runs():
    from bench.fidelity_mode import held_out
    from scheduler.runtime.trace import StepRecord

    def step(start: float) -> StepRecord:
        return StepRecord(instance="d0", role="decode", start=start, prefill=[], decode_ctx=40, decode_batch=2,
                          swap_tokens=0, others_busy=False, end=start + 0.01, arrivals=0)

    fit, low, high = [step(0.0)], [step(1.0), step(1.1)], [step(2.0)]
    picked = held_out(fit, {"1.0": low, "2.0": high}, "1.0")
    assert picked == fit + high  # the fit runs and the other rate's, never the judged rate's own steps
    assert held_out(fit, {"1.0": low, "2.0": high}, "2.0") == fit + low
    with pytest.raises(KeyError):  # a rate without traces would otherwise be fitted to its own runs unnoticed
        held_out(fit, {"1.0": low}, "1")
