"""The engine bench's workers on a tiny random model: every field is there, and both systems generate
the same greedy tokens (the bench compares equal work). Nothing here is timed."""
from __future__ import annotations

import os

import pytest

from bench import engine_bench_report as rep
from bench.engine_bench_workers import Workload, run_worker
from engine.loader import Checkpoint, load_tokenizer
from tests.helpers import hf_model, tiny_config

W = Workload(prefill_len=8, prefill_batches=(1, 2), decode_prompt=4, decode_new=3, decode_batches=(1, 3), iters=1)


@pytest.fixture(scope="module")
def results():
    cfg = tiny_config(tie_word_embeddings=True)
    sd = hf_model(cfg).state_dict()
    sd.pop("lm_head.weight")  # tied: our checkpoints leave it out
    tok = load_tokenizer()
    cores = sorted(os.sched_getaffinity(0))
    return cfg, {s: run_worker(s, Checkpoint(cfg, dict(sd), tok, "tiny"), "float32", cores, W) for s in ("ours", "hf")}


def test_workers_report_every_figure(results):
    _, res = results
    for r in res.values():
        assert r["weight_bytes"] > 0 and r["threads"] >= 1
        assert {"rss_after_load", "peak_rss_run", "lifetime_peak_rss"} <= r["memory"].keys()
        assert sorted(r["prefill"]) == ["1", "2"] and sorted(r["decode"]) == ["1", "3"]
        for p in r["prefill"].values():
            assert p["tok_s"] > 0 and p["forward_tok_s"] > 0 and len(p["tokens"]) == p["batch"]
        for d in r["decode"].values():
            assert d["tok_s"] > 0 and d["decode_only_tok_s"] > 0
            assert [len(t) for t in d["tokens"]] == [W.decode_new] * d["batch"]
    assert res["ours"]["weight_bytes"] == res["hf"]["weight_bytes"]  # tied embedding counted once by both


def test_both_systems_generate_the_same_greedy_tokens(results):
    _, res = results
    for phase in ("prefill", "decode"):
        for b in res["ours"][phase]:
            assert res["ours"][phase][b]["tokens"] == res["hf"][phase][b]["tokens"], (phase, b)


def test_report_rows_ratios_and_tables(results):
    cfg, res = results
    peaks = {"dtype": "float32", "matmul_n": 256, "matmul_flops": 1e10, "matmul_n_bf16": 256,
             "matmul_flops_bf16": 1e9, "copy_bandwidth": 1e10, "gemv_bandwidth": 5e9}
    rows = rep.rows(cfg, res["ours"], res["hf"], peaks)
    names = [r.metric for r in rows]
    assert "decode B=1 tok/s (wall)" in names and "peak RSS while running" in names
    assert all(r.ratio is not None for r in rows if r.hf is not None)
    assert next(r for r in rows if "sequences identical" in r.metric).ours == 1.0
    assert "met?" in rep.text_table(rows) and rep.markdown_table(rows).count("\n") == len(rows) + 1
