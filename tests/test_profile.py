"""The profiler's promise: a profile file the planner loads, whose fit reproduces what was timed
within the error it reports. Tiny random model; no assertion on the times themselves."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from engine.config import CacheConfig
from engine.model import LlamaModel
from scheduler.planner.latency import LatencyModel, load_profile
from scheduler.planner.profile import Grid, build_profile, fold_overhead, profile_json
from tests.helpers import hf_model, tiny_config

CORES = sorted(os.sched_getaffinity(0))
GRID = Grid(prefill_batch=(1, 2), prefill_len=(4, 16, 40), max_prefill_tokens=80, mixed=((8, 24),),
            decode_batch=(1, 3), decode_ctx=(8, 30), warmup=1, repeats=2)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    cfg = tiny_config()
    model = LlamaModel(cfg, hf_model(cfg).state_dict())
    devices = [f"cpu:{CORES[0]}"] + ([f"cpu:{CORES[0]}-{CORES[1]}"] if len(CORES) > 1 else [])
    prof, details = build_profile(model, "tiny", devices, GRID, CacheConfig(num_blocks=32), log=lambda _: None)
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    path.write_text(json.dumps(profile_json(prof, details)))
    return cfg, prof, details, path


def test_profile_file_loads_with_the_planner(profiled):
    cfg, prof, _, path = profiled
    loaded = load_profile(path)
    assert loaded.device_kind == "cpu"
    assert sorted(loaded.tp) == sorted(prof.tp) and 1 in loaded.tp  # tp = cores of the instance
    for tp, c in prof.tp.items():
        assert loaded.tp[tp].prefill == pytest.approx(c.prefill)
        assert loaded.tp[tp].decode_small == pytest.approx(c.decode_small)
        assert loaded.kv_capacity(tp, 1) == 32 * 16  # the instance pool's blocks x block size
    assert loaded.kv_bytes_per_token == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # float32
    assert loaded.transfer_bandwidth_Bps > 0 and loaded.swap_bandwidth_Bps > 0
    assert loaded.precision == {"dtype": "float32", "weights": "dense"}  # what a plan from it asks the server for


def test_profile_covers_the_grid(profiled):
    _, _, details, _ = profiled
    d = details["1"]
    assert [ls for ls, _ in d["prefill_samples"]] == GRID.prefill_batches()
    assert [(s, b) for s, b, _ in d["decode_samples"]] == [(b * c, b) for b in (1, 3) for c in (8, 30)]
    assert all(t > 0 for *_, t in d["prefill_samples"] + d["decode_samples"])


def test_fit_reproduces_samples_within_reported_error(profiled):
    _, prof, details, _ = profiled
    for tp, d in details.items():
        model = LatencyModel(prof.tp[int(tp)])
        fit = d["fit"]
        pre = [abs(model.prefill_ms(ls) - 1 - t) / t for ls, t in d["prefill_samples"]]  # pp=1 adds 1 ms
        dec = [abs(model.decode_ms(s, b) - t) / t for s, b, t in d["decode_samples"]]
        assert max(pre) <= fit["prefill"]["max_rel_error"] + 1e-9
        assert np.mean(pre) == pytest.approx(fit["prefill"]["mean_rel_error"])
        assert max(dec) <= fit["decoding_smallbs"]["max_rel_error"] + 1e-9
        assert np.mean(dec) == pytest.approx(fit["decoding_smallbs"]["mean_rel_error"])


def test_overhead_folds_into_constant_terms(profiled):
    _, prof, _, _ = profiled
    c = prof.tp[1]
    f = fold_overhead(c, 5.0, 2.0)
    assert f.prefill == pytest.approx((c.prefill[0] + 5.0, *c.prefill[1:]))
    assert f.decode_small == pytest.approx((c.decode_small[0] + 2.0, *c.decode_small[1:]))
    assert f.decode_large == pytest.approx((c.decode_large[0] + 2.0, *c.decode_large[1:]))


def test_interference_factors_are_measured_against_a_neighbor():
    if len(CORES) < 2:
        pytest.skip("needs two cores")
    cfg = tiny_config()
    model = LlamaModel(cfg, hf_model(cfg).state_dict())
    prof, _ = build_profile(model, "tiny", [f"cpu:{CORES[0]}"], GRID, CacheConfig(num_blocks=64),
                            neighbor=f"cpu:{CORES[1]}", log=lambda _: None)
    assert set(prof.interference) == {"prefill", "decode"} and all(f > 0 for f in prof.interference.values())


def test_simulator_slows_steps_that_overlap_a_busy_instance():
    # Hand timeline (ms): prefill 10 + 1*l + 1 (pp term); decode 5 + 0*ctx + 0*batch.
    # Request 0 (l=10) prefills 0-21, decodes its 2nd token 21-26 alone. Request 1 arrives just after
    # 21 (while request 0's KV is being pulled) and prefills from there: decode steps that start while
    # it runs take 2x (10 ms), prefill starts next to a busy decode take 3x.
    from scheduler.planner.latency import PhaseCoeffs, Profile
    from scheduler.planner.simulator import Layout, Parallel, simulate

    def prof(factors: dict) -> Profile:
        return Profile("toy", "toy", "cpu", {1: PhaseCoeffs((10, 1, 0), (5, 0, 0), (5, 0, 0))}, {(1, 1): 1600}, 1000,
                       1e12, 1e12, 16, interference=factors)
    lay = Layout("disagg", prefill=Parallel(1), decode=Parallel(1))
    base = simulate(prof({}), lay, [0.0], [(10, 3)]).requests[0]
    assert base.ttft == pytest.approx(0.021) and base.tpot == pytest.approx(0.005, abs=1e-6)
    two = simulate(prof({"decode": 2.0, "prefill": 3.0}), lay, [0.0, 0.021 + 1e-9], [(10, 3), (10, 2)]).requests
    assert two[0].tpot == pytest.approx(0.010, abs=1e-6)  # both its decode steps overlap request 1's prefill
    assert two[1].ttft == pytest.approx(0.021 * 3, abs=1e-6)  # its prefill starts while request 0 decodes


def test_decode_threshold_is_chosen_where_the_fit_is_best():
    from scheduler.planner.profile import fit_decode_threshold

    # batch 1 on its own line (matrix-vector kernels): 50 ms; batch >= 2: 80 + 5*batch + 0.01*context
    dec = [(c, 1, 50.0 + 0.01 * c) for c in (32, 128, 256)]
    dec += [(b * c, b, 80.0 + 5 * b + 0.01 * b * c) for b in (2, 4, 8) for c in (32, 128, 256)]
    pre = [([n], 10.0 + n) for n in (16, 64, 128)]
    coeffs, report = fit_decode_threshold(pre, dec, (2, 4, 95))
    assert coeffs.threshold == 2
    assert coeffs.decode_large == pytest.approx((80.0, 0.01, 5.0))
    assert report["decoding_largebs"]["max_rel_error"] < 1e-9
