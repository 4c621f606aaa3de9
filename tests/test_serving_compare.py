"""`make bench-serving` logic without servers: layouts, capped workload, SLOs, the goodput table."""

from __future__ import annotations

import argparse

import pytest

from bench.datasets import RequestSpec
from bench.serving_compare import FULL, QUICK, apply_defaults, build_parser
from bench.serving_report import (
    CpuSample,
    Mode,
    ModeResult,
    breakdown,
    cap_specs,
    derive_slos,
    layouts,
    markdown_table,
    other_cores,
    parse_metrics,
    pid_cpu,
    probe_specs,
    proc_stat_busy,
    reference_rate,
    workload_tag,
)


class CharTok:
    """One token per character: enough to check cutting and decoding."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


def spec(text: str, out: int) -> RequestSpec:
    ids = CharTok().encode(text)
    return RequestSpec(ids, text, len(ids), out)


def test_two_cores_give_one_disagg_layout_and_equal_kv_budget():
    modes = layouts([0, 1], 1024)
    assert [m.name for m in modes] == ["colocated", "chunked", "disagg-1p1d"]
    assert all(m.cores == 2 for m in modes)
    d = modes[-1].server_args
    assert d[d.index("--prefill-devices") + 1] == "cpu:0" and d[d.index("--decode-devices") + 1] == "cpu:1"
    assert d[d.index("--kv-cache-memory") + 1] == "512MiB"  # two instances share the colocated budget
    assert "--chunked-prefill" in modes[1].server_args


def test_more_cores_list_every_split_or_the_chosen_ones():
    assert [m.name for m in layouts([0, 1, 2, 3], 1024)][2:] == ["disagg-1p3d", "disagg-2p2d", "disagg-3p1d"]
    (m,) = layouts([0, 1, 2, 3], 1024, [3])[2:]
    assert "cpu:0,1,2" in m.server_args and "cpu:3" in m.server_args
    with pytest.raises(ValueError):
        layouts([0, 1], 1024, [2])


def test_cap_keeps_the_prompt_tail_and_caps_outputs():
    specs = cap_specs([spec("abcdefgh", 100), spec("xy", 3)], max_prompt=4, max_output=64, tok=CharTok())
    assert specs[0].prompt_ids == CharTok().encode("efgh") and specs[0].prompt_text == "efgh"
    assert (specs[0].prompt_len, specs[0].output_len) == (4, 64)
    assert (specs[1].prompt_text, specs[1].output_len) == ("xy", 3)
    assert workload_tag(512, 64) == "sharegpt-p512-o64"


def test_probes_have_the_mean_prompt_and_longest_output():
    probes = probe_specs([spec("a" * 10, 5), spec("b" * 2, 9), spec("c" * 6, 1)], k=3, tok=CharTok())
    assert [(p.prompt_len, p.output_len) for p in probes] == [(6, 9)] * 3
    assert {p.prompt_text for p in probes} == {"a" * 6, "c" * 6}


def test_slos_are_scale_times_mean_unloaded_latency():
    s = derive_slos([0.4, 0.6], [0.05, 0.07], ttft_scale=5, tpot_scale=3, source="colocated")
    assert s.ttft == pytest.approx(2.5) and s.tpot == pytest.approx(0.18)
    assert "5 x unloaded mean TTFT 0.500" in s.describe() and "colocated" in s.describe()
    with pytest.raises(ValueError):
        derive_slos([], [0.1], 5, 3, "x")
    with pytest.raises(ValueError):
        derive_slos([0.1], [0.1], 0, 3, "x")


def _summary(att: float, ttft: float = 1.0, tpot: float = 0.1) -> dict:
    return {"attainment_both": att, "ttft_p90": ttft, "tpot_p90": tpot}


def _result(name: str, goodput: float, runs: dict[float, dict], cores: int = 2) -> ModeResult:
    return ModeResult(Mode(name, (), f"{name} devices", cores), goodput, runs)


def test_table_gives_goodput_per_core_and_ratio_to_colocated():
    results = [
        _result("colocated", 1.0, {0.5: _summary(1.0), 1.0: _summary(0.95, 2.0, 0.2)}),
        _result("disagg-1p1d", 0.5, {0.5: _summary(0.92), 1.0: _summary(0.3)}),
        _result("disagg-2p2d", 3.0, {0.5: _summary(1.0), 1.0: _summary(1.0)}, cores=4),
    ]
    assert reference_rate(results, 0.9) == 1.0  # colocated still passes at 1.0
    table = markdown_table(results, 1.0)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()[2:]}
    assert rows["colocated"][3:6] == ["1", "0.5", "1.00x"]
    assert rows["disagg-1p1d"][3:6] == ["0.5", "0.25", "0.50x"]
    assert rows["disagg-2p2d"][3:6] == ["3", "0.75", "1.50x"]  # per core, not per server
    assert rows["colocated"][6:9] == ["2.00", "200.0", "95%"]


def test_reference_rate_falls_back_to_the_lowest_common_rate():
    results = [_result("colocated", 0, {0.5: _summary(0.2), 1.0: _summary(0.1)}), _result("x", 0, {0.5: _summary(0)})]
    assert reference_rate(results, 0.9) == 0.5
    assert reference_rate([_result("a", 0, {1.0: _summary(1)}), _result("b", 0, {2.0: _summary(1)})], 0.9) is None


def test_breakdown_is_the_mean_between_two_scrapes():
    page = """# HELP x
distserve_queueing_seconds_sum {q}
distserve_queueing_seconds_count {n}
distserve_time_to_first_token_seconds_sum {t}
distserve_time_to_first_token_seconds_count {n}
distserve_kv_transfer_seconds_count 0.0
distserve_running_requests{{instance="p0",role="prefill",device="cpu:0"}} 3.0
"""
    before = parse_metrics(page.format(q=1.0, t=2.0, n=2))
    after = parse_metrics(page.format(q=3.0, t=8.0, n=4))
    assert "distserve_running_requests" not in after  # labelled gauges are skipped
    b = breakdown(before, after)
    assert b["queueing"] == pytest.approx(1.0) and b["ttft"] == pytest.approx(3.0)
    assert b["prefill"] == pytest.approx(2.0) and b["transfer"] is None and b["tpot"] is None


def test_quick_only_fills_flags_left_unset():
    args = build_parser().parse_args(["--quick", "--rates", "0.1,0.2"])
    apply_defaults(args)
    assert args.rates == [0.1, 0.2] and args.num_requests == QUICK["num_requests"]
    full = build_parser().parse_args([])
    apply_defaults(full)
    assert isinstance(full, argparse.Namespace) and full.num_requests == FULL["num_requests"]


def test_other_processes_cpu_is_machine_busy_minus_ours():
    assert proc_stat_busy("cpu  100 5 50 1000 20 3 2 0 0 0", hz=100) == pytest.approx(1.6)
    stat = "123 (python -m x) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 9 0 100 1 2"
    assert pid_cpu(stat, hz=100) == pytest.approx(3.0)
    before, after = CpuSample(10.0, 100.0, 20.0), CpuSample(12.0, 103.0, 22.0)
    assert other_cores(before, after) == pytest.approx(0.5)  # 3 busy s - 2 of ours over 2 s of wall
    assert other_cores(after, after) is None
