"""Latency models: DistServe's formulas, the least-squares fit, and the profile files."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from scheduler.planner.latency import LatencyModel, PhaseCoeffs, fit_coeffs, fit_decode, fit_prefill, load_profile

DATA = Path(__file__).resolve().parents[1] / "scheduler" / "planner" / "data" / "distserve-a100"


def test_formulas_match_distserve():
    c = PhaseCoeffs([10, 0.5, 0.001], [5, 0.01, 1], [2, 0.02, 2], threshold=4)
    m = LatencyModel(c)
    assert m.prefill_ms([100, 200]) == pytest.approx(10 + 0.5 * 300 + 0.001 * (100**2 + 200**2) + 1)
    assert m.decode_ms(1000, 3) == pytest.approx(5 + 10 + 3)  # below the threshold
    assert m.decode_ms(1000, 4) == pytest.approx(2 + 20 + 8)  # at it: the large-batch coefficients
    pp = LatencyModel(c, pp=2)
    assert pp.prefill_ms([100]) == pytest.approx((10 + 50 + 10) / 2 + 2)
    assert pp.decode_ms(1000, 3) == pytest.approx(18 / 2)


def test_chunks_of_a_prompt_cost_its_quadratic_term():
    # chunking 100 tokens into 64 + 36 pays the constant twice but the same token and attention terms
    m = LatencyModel(PhaseCoeffs([10, 1, 0.001], [5, 0, 1], [5, 0, 1]))
    whole = m.prefill_ms([100])
    chunked = m.mixed_ms([(64, 0)], 0, 0) + m.mixed_ms([(36, 64)], 0, 0)
    assert chunked == pytest.approx(whole + 10 + 1)
    # a mixed step adds the decodes' per-token terms, not their constant
    assert m.mixed_ms([(36, 64)], 500, 3) == pytest.approx(m.mixed_ms([(36, 64)], 0, 0) + 3)


def test_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    true_p, true_s, true_l = (12.0, 0.07, 3e-6), (9.0, 4e-4, 0.05), (7.0, 3e-4, 0.09)
    pre = []
    for _ in range(60):
        ls = [int(x) for x in rng.integers(16, 2048, rng.integers(1, 8))]
        t = true_p[0] + true_p[1] * sum(ls) + true_p[2] * sum(n * n for n in ls)
        pre.append((ls, t * (1 + rng.normal(0, 0.005))))
    dec = []
    for _ in range(120):
        b = int(rng.integers(1, 200))
        s = int(b * rng.integers(64, 2048))
        a, bb, c = true_s if b < 95 else true_l
        dec.append((s, b, (a + bb * s + c * b) * (1 + rng.normal(0, 0.005))))
    coeffs, report = fit_coeffs(pre, dec, threshold=95)
    np.testing.assert_allclose(coeffs.prefill, true_p, rtol=0.1)
    np.testing.assert_allclose(coeffs.decode_small, true_s, rtol=0.1)
    np.testing.assert_allclose(coeffs.decode_large, true_l, rtol=0.1)
    assert report["prefill"]["mean_rel_error"] < 0.01
    assert report["decoding_largebs"]["samples"] == sum(b >= 95 for _, b, _ in dec)


def test_fit_is_exact_without_noise_and_reports_error():
    f = fit_prefill([([100], 110.0), ([200], 210.0), ([100, 100], 210.0), ([300], 310.0)])
    assert f.coeffs == pytest.approx((10, 1, 0), abs=1e-6)
    assert f.max_rel_error < 1e-9
    small, large = fit_decode([(100, 1, 6.0), (200, 2, 7.1), (400, 3, 8.3), (800, 5, 10.7)], threshold=95)
    assert small is large  # no large-batch samples: both sides use one fit
    with pytest.raises(ValueError):
        fit_prefill([([1], 1.0)])


def test_distserve_profile_reads_into_our_structure():
    p = load_profile(DATA / "profiler-a100-80g.distserve.json", "facebook/opt-13b")
    assert sorted(p.tp) == [1, 2, 4]
    assert p.kv_capacity(1, 1) == 66144 and p.kv_capacity(2, 4) == 744224
    assert p.kv_capacity(3, 1) is None
    assert p.kv_bytes_per_token == 2 * 2 * 40 * 5120
    assert p.tp[1].prefill[0] == pytest.approx(18.10254647486372)
    assert (1, 4) in p.layouts(4) and (4, 2) not in p.layouts(4)
    with pytest.raises(ValueError, match="several models"):
        load_profile(DATA / "profiler-a100-80g.distserve.json")


def test_own_format_round_trips(tmp_path):
    p = load_profile(DATA / "profiler-a100-80g.distserve.json", "facebook/opt-66b")
    f = tmp_path / "profile.json"
    f.write_text(json.dumps(p.to_json()))
    q = load_profile(f)
    assert q.model == p.model and q.kv_capacity_tokens == p.kv_capacity_tokens
    assert q.tp[8].decode_large == p.tp[8].decode_large
    # a CPU profile may give one per-device capacity that scales with the instance's devices
    f.write_text(json.dumps(p.to_json() | {"kv_capacity_tokens": 1000, "device_kind": "cpu"}))
    assert load_profile(f).kv_capacity(2, 2) == 4000
    # step noise (multipliers drawn by the simulator) survives the round trip; without it the key is absent
    assert "step_noise" not in p.to_json()
    f.write_text(json.dumps(dataclasses.replace(p, step_noise={"decode": (0.9, 1.2)}).to_json()))
    assert load_profile(f).step_noise == {"decode": (0.9, 1.2)}
    # so does the arrival stall (ms a step in flight grows per arriving request); DistServe's has none
    assert "arrival_stall_ms" not in p.to_json() and p.arrival_stall_ms == {}
    f.write_text(json.dumps(dataclasses.replace(p, arrival_stall_ms={"prefill": 2.5, "decode": 3.5}).to_json()))
    assert load_profile(f).arrival_stall_ms == {"prefill": 2.5, "decode": 3.5}
