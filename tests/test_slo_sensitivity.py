"""Re-judging a serving comparison at scaled SLOs (bench/slo_sensitivity.py), on hand-made result files."""
from __future__ import annotations

import json

from bench.metrics import MeasuredRequest
from bench.slo_sensitivity import goodput, load, main, table


def write(root, mode: str, rate: float, timings: list[tuple[float, float]], cores: int = 2) -> None:
    """One result file: a request per (ttft, tpot); SLOs 1 s / 0.1 s, target 90%."""
    reqs = [MeasuredRequest(index=i, prompt_len=10, output_len=10, send_time=0.0, finished=True, ttft=t,
                            tpot=p).to_dict() for i, (t, p) in enumerate(timings)]
    d = root / mode
    d.mkdir(exist_ok=True)
    doc = {"num_gpus": cores, "ttft_slo": 1.0, "tpot_slo": 0.1, "attainment_target": 0.9, "rate": rate,
           "requests": reqs}
    (d / f"results-{mode}-rate{rate}.json").write_text(json.dumps(doc))


def fixture(tmp_path):
    ok, slow_tpot, slow_ttft = (0.5, 0.05), (0.5, 0.15), (1.5, 0.05)
    write(tmp_path, "colocated", 1.0, [ok] * 10)
    write(tmp_path, "colocated", 2.0, [ok] * 5 + [slow_tpot] * 5)  # TPOT-bound
    write(tmp_path, "colocated", 3.0, [ok] * 10)  # a noisy pass above a failure does not count
    write(tmp_path, "disagg-1p1d", 1.0, [ok] * 10)
    write(tmp_path, "disagg-1p1d", 2.0, [ok] * 9 + [slow_ttft])
    write(tmp_path, "disagg-1p1d", 3.0, [ok] * 5 + [slow_ttft] * 5)  # TTFT-bound
    return load(tmp_path)


def test_goodput_is_the_highest_rate_passing_with_every_rate_below(tmp_path):
    modes = fixture(tmp_path)
    assert goodput(modes["colocated"], 1, 1) == 1.0
    assert goodput(modes["disagg-1p1d"], 1, 1) == 2.0
    assert goodput(modes["colocated"], 1, 1.5) == 3.0  # TPOT SLO 0.15 s: the slow decodes pass
    assert goodput(modes["disagg-1p1d"], 2, 1) == 3.0  # TTFT SLO 2 s
    assert goodput(modes["colocated"], 0.4, 1) == 0.0  # TTFT SLO 0.4 s: nothing passes


def test_table_gives_the_per_core_ratio_at_each_scale_pair(tmp_path, capsys):
    rows = table(fixture(tmp_path), [1.0, 2.0], [1.0, 1.5]).splitlines()
    assert rows[2] == "| 1x | 2.00x (2 vs 1) | 3.00x (3 vs 1) |"
    assert rows[3] == "| 1.5x | 0.67x (2 vs 3) | 1.00x (3 vs 3) |"
    assert main([str(tmp_path), "--ttft-scales", "0.4", "--tpot-scales", "1"]) == 0
    assert "| 1x | - (0 vs < 1) |" in capsys.readouterr().out
