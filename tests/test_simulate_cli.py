"""`python -m scheduler.simulate`: one layout, one request file, one profile -> per-request latencies and
attainment, on a request file whose answer is computed by hand."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.planner.latency import PhaseCoeffs, Profile
from scheduler.simulate import main

ROOT = Path(__file__).resolve().parents[1]

# prefill 10 + 1*tokens (+1 ms, DistServe's pp term) ms; decode 5 + 1*batch ms; a pull moves 1000 B per
# token at 1e7 B/s (0.1 ms per token).
PROFILE = Profile("toy", "toy", "cuda", {1: PhaseCoeffs((10, 1, 0), (5, 0, 1), (5, 0, 1), threshold=1000)},
                  {(1, 1): 4096, (1, 2): 4096}, kv_bytes_per_token=1000, transfer_bandwidth_Bps=1e7)
REQUESTS = [
    # r0: prefill 0-111 (TTFT 0.111); pull 111-121; decode 121-127, 127-133: TPOT (0.133 - 0.111) / 2 = 0.011
    {"arrival": 0.0, "prompt_len": 100, "output_len": 3},
    # r1: waits for r0; prefill 111-322 (TTFT 0.312); pull 322-342; decode 342-348: TPOT 0.026
    {"arrival": 0.010, "prompt_len": 200, "output_len": 2},
    # r2: prefill 1000-1061 (TTFT 0.061); one output token: no TPOT, meets any TPOT SLO
    {"arrival": 1.0, "prompt_len": 50, "output_len": 1},
]


@pytest.fixture
def files(tmp_path):
    prof, reqs = tmp_path / "profile.json", tmp_path / "requests.json"
    prof.write_text(json.dumps(PROFILE.to_json()))
    reqs.write_text(json.dumps(REQUESTS))
    return prof, reqs


def test_disaggregated_layout_on_a_hand_computed_request_file(files, tmp_path):
    prof, reqs = files
    out = tmp_path / "result.json"
    assert main(["--profile", str(prof), "--requests", str(reqs), "--prefill", "tp=1,pp=1", "--decode", "tp=1,pp=1",
                 "--ttft-slo", "0.2", "--tpot-slo", "0.0105", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["ttft"] for r in res["requests"]] == pytest.approx([0.111, 0.312, 0.061])
    assert res["requests"][0]["tpot"] == pytest.approx(0.011)
    assert res["requests"][1]["tpot"] == pytest.approx(0.026)
    assert res["requests"][2]["tpot"] is None
    assert [r["prompt_len"] for r in res["requests"]] == [100, 200, 50]  # file order
    # TTFT <= 0.2: r0, r2; TPOT <= 0.0105: r2 only (r0's 11 ms misses); both: r2
    assert res["attainment"] == pytest.approx({"ttft": 2 / 3, "tpot": 1 / 3, "both": 1 / 3})
    assert res["layout"] == {"mode": "disagg", "prefill": {"tp": 1, "pp": 1, "n": 1},
                             "decode": {"tp": 1, "pp": 1, "n": 1}}
    assert res["profile"]["model"] == "toy"


def test_pipeline_and_colocated_layouts(files, capsys):
    prof, reqs = files
    # r0 alone through a 2-stage prefill pipeline: (10 + 100) / 2 + 2 = 57 ms a stage, TTFT 0.114
    assert main(["--profile", str(prof), "--requests", str(reqs), "--prefill", "tp=1,pp=2", "--decode", "tp=1,pp=1",
                 "--ttft-slo", "1", "--tpot-slo", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["requests"][0]["ttft"] == pytest.approx(0.114)
    assert res["attainment"]["both"] == 1.0
    assert main(["--profile", str(prof), "--requests", str(reqs), "--colocated", "tp=1,pp=1,n=2", "--chunked",
                 "--ttft-slo", "1", "--tpot-slo", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["layout"] == {"mode": "colocated", "colocated": {"tp": 1, "pp": 1, "n": 2}, "chunked": True}
    assert all(r["finished"] for r in res["requests"])


@pytest.mark.parametrize("layout, words", [
    (["--prefill", "tp=1,pp=1"], "--decode"),
    (["--colocated", "tp=1,pp=1", "--decode", "tp=1,pp=1"], "--colocated alone"),
    (["--prefill", "tp=4,pp=1", "--decode", "tp=1,pp=1"], "no tp=4"),
])
def test_a_layout_that_cannot_run_says_why(files, capsys, layout, words):
    prof, reqs = files
    assert main(["--profile", str(prof), "--requests", str(reqs), *layout, "--ttft-slo", "1", "--tpot-slo", "1"]) == 2
    assert words in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--profile", str(prof), "--requests", str(reqs), "--colocated", "tp=1,p=1", "--ttft-slo", "1",
              "--tpot-slo", "1"])


def test_runs_as_a_module_on_distserves_profile(tmp_path):
    reqs = tmp_path / "requests.json"
    reqs.write_text(json.dumps([{"arrival": i * 0.5, "prompt_len": 700, "output_len": 50} for i in range(4)]))
    a100 = ROOT / "scheduler/planner/data/distserve-a100/profiler-a100-80g.distserve.json"
    proc = subprocess.run([sys.executable, "-m", "scheduler.simulate", "--profile", str(a100), "--model",
                           "facebook/opt-13b", "--requests", str(reqs), "--prefill", "tp=2,pp=1", "--decode",
                           "tp=1,pp=1", "--ttft-slo", "0.2", "--tpot-slo", "0.1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["attainment"]["both"] == 1.0 and len(res["requests"]) == 4
