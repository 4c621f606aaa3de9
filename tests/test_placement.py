"""The placement search: known answers in small crafted spaces, the CLI and plan file, and a
plan for OPT-13B on one node of four A100s from DistServe's published profile."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from engine.config import SchedulerConfig, parse_device
from scheduler.planner.goodput import Workload, goodput
from scheduler.planner.latency import PhaseCoeffs, Profile, load_profile
from scheduler.planner.placement import main, run_search
from scheduler.planner.search import Cluster, Planner
from scheduler.planner.simulator import Layout, Parallel
from scheduler.planner.workload import SLO, synth_lengths, unit_arrivals
from serving.plan import PlanError, load_plan

A100 = Path(__file__).resolve().parents[1] / "scheduler/planner/data/distserve-a100/profiler-a100-80g.distserve.json"


def crafted(kind: str = "cuda") -> Profile:
    """tp2 prefill is 10x faster than tp1 (5x per device); tp2 decode is no faster than tp1."""
    dec = (5, 0.0, 0.5)
    return Profile(model="toy", device="toy", device_kind=kind,
                   tp={1: PhaseCoeffs((20, 1.0, 0), dec, dec), 2: PhaseCoeffs((10, 0.1, 0), dec, dec)},
                   kv_capacity_tokens={(1, 1): 100_000, (2, 1): 200_000}, kv_bytes_per_token=1000,
                   transfer_bandwidth_Bps=1e10)


def work(lengths, ttft=0.3, tpot=0.05, n=120):
    lengths = lengths if isinstance(lengths, list) else [lengths] * n
    return Workload(lengths, unit_arrivals(len(lengths), seed=1), SLO(ttft, tpot), SchedulerConfig())


def test_search_finds_the_crafted_best():
    planner = Planner(crafted(), Cluster(1, 4), work((200, 20)))
    g = {(role, tp): planner.phase_goodput(role, tp, 1).median for role in ("prefill", "decode") for tp in (1, 2)}
    assert g["prefill", 2] / 2 > 2 * g["prefill", 1]
    assert g["decode", 1] > g["decode", 2] / 2 * 1.5
    best = planner.algorithm1()[0]
    assert best.method == "joint" and best.goodput > 0
    assert (best.layout.prefill.tp, best.layout.decode.tp) == (2, 1)
    assert best.layout.devices == 4


def test_algorithm2_keeps_units_inside_nodes(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(crafted().to_json()))
    out = tmp_path / "plan.json"
    assert main(["--profile", str(f), "--num-nodes", "2", "--devices-per-node", "3", "--dataset", "fixed:200:20",
                 "--ttft-slo", "0.3", "--tpot-slo", "0.05", "--num-requests", "80", "--algorithm", "alg2",
                 "--no-colocated", "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["mode"] == "disagg" and plan["algorithm"] == "alg2"
    for node in ("node0", "node1"):  # each node holds both phases: hand-offs never leave it
        assert any(node in d for d in plan["devices"]["prefill_devices"])
        assert any(node in d for d in plan["devices"]["decode_devices"])
    assert plan["prefill"]["instances"] == len(plan["devices"]["prefill_devices"])


def test_cli_writes_a_plan_the_server_can_read(tmp_path, capsys):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(crafted().to_json()))
    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps([[200, 20], [150, 30]] * 40))
    out = tmp_path / "plan.json"
    assert main(["--profile", str(f), "--devices-per-node", "4", "--lengths-file", str(lengths), "--ttft-slo", "0.3",
                 "--tpot-slo", "0.05", "--max-tp", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "best:" in text and "colocated" in text  # the baselines are ranked too
    plan = json.loads(out.read_text())
    assert set(plan) >= {"model", "mode", "prefill", "decode", "goodput_per_device", "slo", "devices"}
    assert plan["slo"] == {"ttft": 0.3, "tpot": 0.05, "attainment": 0.9}
    assert plan["prefill"]["tp"] == plan["decode"]["tp"] == 1
    devices = plan["devices"].get("prefill_devices", []) + plan["devices"].get("decode_devices", []) \
        + plan["devices"].get("devices", [])
    assert sorted(devices) == [f"cuda:{i}" for i in range(4)]
    for d in devices:
        parse_device(d)


def test_cpu_profile_plan_round_trips_through_the_server(tmp_path, capsys):
    """--max-tp 1 --max-pp 1 plans what this engine runs: server.py --plan takes the plan as written."""
    import server

    f = tmp_path / "p.json"
    f.write_text(json.dumps(crafted("cpu").to_json()))
    out = tmp_path / "plan.json"
    assert main(["--profile", str(f), "--devices-per-node", "2", "--dataset", "fixed:200:20", "--ttft-slo", "0.5",
                 "--tpot-slo", "0.1", "--num-requests", "60", "--max-tp", "1", "--max-pp", "1", "--seeds", "1",
                 "--out", str(out)]) == 0
    assert "note:" not in capsys.readouterr().out  # nothing the server would refuse
    plan = json.loads(out.read_text())
    devices = sum(plan["devices"].values(), [])
    assert sorted(devices) == ["cpu:0", "cpu:1"]
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("the plan is for cores 0 and 1")
    config = server.engine_config(server.build_parser().parse_args(["--plan", str(out)]))
    assert config.mode == plan["mode"]
    assert sorted(config.prefill_devices + config.decode_devices if config.mode == "disagg" else config.devices) \
        == devices


def test_a_plan_priced_with_two_precisions_serves_them(tmp_path):
    """--decode-profile: the plan carries each phase's engine settings from its profile, and server.py --plan runs
    them (a bf16 prefill instance beside a native decode one); the colocated baselines stay on --profile's."""
    import server

    pre, dec = crafted("cpu"), crafted("cpu")
    pre.precision, dec.precision = {"dtype": "bfloat16", "weights": "dense"}, {"dtype": "float32", "weights": "native"}
    dec.tp = {t: PhaseCoeffs(c.prefill, (1, 0.0, 0.1), (1, 0.0, 0.1)) for t, c in dec.tp.items()}  # faster decode
    paths = {}
    for name, prof in (("pre", pre), ("dec", dec)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(prof.to_json()))
    out = tmp_path / "plan.json"
    assert main(["--profile", str(paths["pre"]), "--decode-profile", str(paths["dec"]), "--devices-per-node", "2",
                 "--dataset", "fixed:200:20", "--ttft-slo", "0.5", "--tpot-slo", "0.004", "--num-requests", "60",
                 "--max-tp", "1", "--max-pp", "1", "--seeds", "1", "--quiet", "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["mode"] == "disagg"  # only the native decode meets a 4 ms TPOT
    assert plan["precision"] == {"dtype": "bfloat16", "weights": "dense", "decode_dtype": "float32",
                                 "decode_weights": "native"}
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("the plan is for cores 0 and 1")
    config = server.engine_config(server.build_parser().parse_args(["--plan", str(out)]))
    assert config.precision("prefill") == ("bfloat16", "dense")
    assert config.precision("decode") == ("float32", "native")
    plan["precision"]["bogus"] = "x"
    out.write_text(json.dumps(plan))
    with pytest.raises(PlanError, match="precision"):
        load_plan(str(out))


def test_a_plan_this_engine_cannot_run_names_the_flags_that_avoid_it(tmp_path, capsys):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(crafted().to_json()))
    out = tmp_path / "plan.json"
    assert main(["--profile", str(f), "--devices-per-node", "4", "--dataset", "fixed:200:20", "--ttft-slo", "0.3",
                 "--tpot-slo", "0.05", "--num-requests", "60", "--seeds", "1", "--no-colocated", "--quiet",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["prefill"]["tp"] == 2  # the crafted best (see the first test)
    assert "--max-tp 1 --max-pp 1" in capsys.readouterr().out
    with pytest.raises(PlanError, match="--max-tp 1 --max-pp 1"):
        load_plan(str(out))


def test_goodput_is_the_median_over_seeds_and_the_ranking_says_how_to_read_it(tmp_path, capsys):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(crafted().to_json()))
    out = tmp_path / "plan.json"
    assert main(["--profile", str(f), "--devices-per-node", "3", "--dataset", "fixed:200:20", "--ttft-slo", "0.3",
                 "--tpot-slo", "0.05", "--num-requests", "60", "--seeds", "3", "--max-tp", "1", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "prefill alone, one tp1 pp1 instance:" in cap.err  # progress while it searches
    assert "[min-max of 3]" in cap.out and "median over 3 arrival draws (seeds 0-2)" in cap.out
    assert "phases rows rank below every simulated row" in cap.out
    plan = json.loads(out.read_text())
    assert len(plan["goodput_per_draw"]) == 3 and plan["goodput"] == pytest.approx(np.median(plan["goodput_per_draw"]))
    assert plan["workload"]["seeds"] == [0, 1, 2]
    # each draw's goodput is what a search on that draw alone finds (within the search's tolerance)
    lengths = [(200, 20)] * 60
    draws = np.stack([unit_arrivals(60, seed=s) for s in range(3)])
    lay = Layout("prefill", prefill=Parallel(1))
    both = goodput(crafted(), lay, Workload(lengths, draws, SLO(0.3, 0.05), SchedulerConfig()))
    for s in range(3):
        alone = goodput(crafted(), lay, Workload(lengths, draws[s], SLO(0.3, 0.05), SchedulerConfig())).median
        assert both.per_draw[s] == pytest.approx(alone, rel=0.04)


def test_synthetic_lengths_match_published_means():
    for name, (mean_in, mean_out) in {"sharegpt": (756, 200), "humaneval": (171, 98),
                                      "longbench": (1738, 91)}.items():
        lengths = np.array(synth_lengths(name, 3000, seed=3))
        assert lengths[:, 0].mean() == pytest.approx(mean_in, rel=0.08), name
        assert lengths[:, 1].mean() == pytest.approx(mean_out, rel=0.1), name
    assert synth_lengths("sharegpt", 10, seed=1) == synth_lengths("sharegpt", 10, seed=1)


def test_unit_arrivals_have_the_asked_rate_and_burstiness():
    for process, cv in (("poisson", 1.0), ("gamma", 2.0), ("fixed", 0.0)):
        gaps = np.diff(unit_arrivals(20000, process, cv if cv else 1.0, seed=2))
        assert gaps.mean() == pytest.approx(1.0, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, abs=0.1)


def test_opt13b_on_one_node_of_four_a100s():
    profile = load_profile(A100, "facebook/opt-13b")
    lengths = synth_lengths("sharegpt", 300, seed=0)
    w = Workload(lengths, unit_arrivals(300, seed=0), SLO(0.25, 0.1), SchedulerConfig(**profile.scheduler))
    t0 = time.perf_counter()
    cands = run_search(profile, Cluster(1, 4), w)
    assert time.perf_counter() - t0 < 60
    best = cands[0]
    assert best.layout.devices == 4 and best.goodput > 0 and best.method != "phases"
    assert any(c.layout.mode == "disagg" and c.method == "joint" for c in cands)


def test_opt13b_disaggregation_wins_under_a_tight_tpot():
    # DistServe's motivating example (OPT-13B, 512 in / 64 out, TTFT 0.4 s, TPOT 0.04 s): prefill
    # steps stall colocated decodes, so splitting the phases gives more goodput per device.
    # pp is held at 1: DistServe's latency/pp model would flatter deep pipelines here.
    profile = load_profile(A100, "facebook/opt-13b")
    w = Workload([(512, 64)] * 300, unit_arrivals(300, seed=0), SLO(0.4, 0.04), SchedulerConfig(**profile.scheduler))
    cands = run_search(profile, Cluster(1, 4), w, max_pp=1)
    best_disagg = max(c.goodput for c in cands if c.layout.mode == "disagg" and c.method == "joint")
    best_coloc = max(c.goodput for c in cands if c.layout.mode == "colocated")
    assert best_disagg > 1.2 * best_coloc
    assert cands[0].layout.mode == "disagg" and cands[0].layout.devices == 4


def test_opt13b_chatbot_against_vllm_picks_distserves_placement():
    # The paper's chatbot setting (ShareGPT, TTFT 0.25 s, TPOT 0.1 s) against vLLM's own A100 profile
    # for the colocated baselines: disaggregation wins, with more parallelism for prefill than decode.
    profile = load_profile(A100, "facebook/opt-13b")
    vllm = load_profile(A100.with_name("profiler-a100-80g.vllm.json"), "facebook/opt-13b")
    lengths = synth_lengths("sharegpt", 300, seed=0)
    w = Workload(lengths, unit_arrivals(300, seed=0), SLO(0.25, 0.1), SchedulerConfig(**profile.scheduler))
    best = run_search(profile, Cluster(1, 4), w, max_pp=1, colocated_profile=vllm)[0]
    assert best.layout.mode == "disagg" and best.layout.devices == 4
    assert best.layout.prefill.tp >= best.layout.decode.tp
