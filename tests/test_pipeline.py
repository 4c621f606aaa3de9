"""Pipeline parallelism as DistServe's simulator models it: a step visits an instance's pp stages in
turn, each stage holding it for the step's time / pp (+ pp ms for a prefill), and a new step enters
stage 1 as soon as stage 1 is free. Timelines computed by hand, with round coefficients:

prefill a + b*tokens = 10 + 1*tokens ms; decode a + c*batch = 5 + 1*batch ms; KV 1000 bytes per token.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from engine.config import SchedulerConfig
from scheduler.planner.goodput import Workload, capacity
from scheduler.planner.latency import PhaseCoeffs, Profile, load_profile
from scheduler.planner.simulator import Layout, Parallel, Simulation
from scheduler.planner.workload import SLO

DATA = Path(__file__).resolve().parents[1] / "scheduler" / "planner" / "data" / "distserve-a100"


def profile(transfer: float = 1e15) -> Profile:
    c = PhaseCoeffs((10, 1, 0), (5, 0, 1), (5, 0, 1), threshold=1000)
    return Profile("toy", "toy", "cuda", {1: c}, {(1, 1): 4096, (1, 2): 4096}, kv_bytes_per_token=1000,
                   transfer_bandwidth_Bps=transfer, block_size=16)


def run(layout: Layout, arrivals: list[float], lengths: list[tuple[int, int]], prof: Profile | None = None,
        cfg: SchedulerConfig | None = None):
    sim = Simulation(prof or profile(), layout, cfg or SchedulerConfig())
    res = sim.run(arrivals, lengths)
    sim.check()
    assert all(s.allocator.num_used == 0 and not s.busy and s.steps == 0 for s in sim.slots)
    return res.requests


def test_two_prefill_batches_overlap_across_two_stages():
    # pp=2: a 100-token prefill holds each stage (10 + 100) / 2 + 2 = 57 ms.
    # r0 (t=0):  stage 1 0-57, stage 2 57-114                -> TTFT 114 ms (the whole step, not 57)
    # r1 (t=10): waits for stage 1; stage 1 57-114, stage 2 114-171  -> TTFT 161 ms, while r0 is in stage 2
    # One stage-less instance (pp=1) would take 111 ms per prefill: r1 done at 222.
    lay = Layout("prefill", prefill=Parallel(1, 2))
    res = run(lay, [0.0, 0.010], [(100, 4), (100, 4)], cfg=SchedulerConfig(max_prefill_seqs=1))
    assert [r.ttft for r in res] == pytest.approx([0.114, 0.161])
    assert [r.prefill_start for r in res] == pytest.approx([0.0, 0.057])
    flat = run(Layout("prefill", prefill=Parallel(1)), [0.0, 0.010], [(100, 4)] * 2)
    assert [r.ttft for r in flat] == pytest.approx([0.111, 0.212])


def test_decode_batches_take_turns_in_a_two_stage_pipeline():
    # decode-only, pp=2: one request per step holds each stage (5 + 1) / 2 = 3 ms; each pull 1 ms
    # (100 tokens x 1000 B at 1e8 B/s), on stage 1's time. Prefilled requests: first token at arrival.
    # r0 (t=0): pull 0-1; step 1-4 | 4-7 (token at 7); step 8-11 | 11-14 (token at 14: done)
    # r1 (t=1.5): stage 1 busy until 4; pull 4-5; step 5-8 | 8-11 (token at 11); step 11-14 | 14-17
    # r0's second step waits for stage 1 (r1's step holds it until 8), not for r1's whole step.
    res = run(Layout("decode", decode=Parallel(1, 2)), [0.0, 0.0015], [(100, 3), (100, 3)], profile(1e8))
    assert [r.tpot for r in res] == pytest.approx([0.007, (0.017 - 0.0015) / 2])


def test_stage_times_are_distserves():
    # simdistserve/estimators/time_estimator.py prices every stage worker as delay / pp + pp_const,
    # pp_const = pp ms for a prefill and 0 for a decode; its pipeline of pp workers runs a batch pp times.
    prof = load_profile(DATA / "profiler-a100-80g.distserve.json", "facebook/opt-13b")
    for tp in (1, 2, 4):
        a, b, c = prof.tp[tp].prefill
        ds, dl = prof.tp[tp].decode_small, prof.tp[tp].decode_large
        for pp in (1, 2, 4):
            m = prof.model_for(tp, pp)
            lens = [700, 300]
            assert m.prefill_ms(lens) == pytest.approx((a + b * 1000 + c * (700**2 + 300**2)) / pp + pp)
            assert m.decode_ms(5000, 10) == pytest.approx((ds[0] + ds[1] * 5000 + ds[2] * 10) / pp)
            assert m.decode_ms(50000, 100) == pytest.approx((dl[0] + dl[1] * 50000 + dl[2] * 100) / pp)


def test_one_request_takes_the_whole_step_time_and_a_full_pipeline_pp_times_the_throughput():
    # 8 prompts at once, one per batch: pp=1 releases one every 111 ms; pp=2 one every 57 ms after the
    # first has crossed both stages (114 ms); pp=4 ((110)/4 + 4 = 31.5 ms a stage) every 31.5 ms after 126.
    arrivals = [i * 1e-9 for i in range(8)]
    cfg = SchedulerConfig(max_prefill_seqs=1)
    prof = profile()
    prof.kv_capacity_tokens[(1, 4)] = 4096
    for pp, stage in ((1, 0.111), (2, 0.057), (4, 0.0315)):
        res = run(Layout("prefill", prefill=Parallel(1, pp)), arrivals, [(100, 2)] * 8, prof, cfg)
        done = [r.ttft + r.arrival for r in res]
        assert done == pytest.approx([pp * stage + i * stage for i in range(8)])


def test_capacity_prices_pipelines_like_the_simulator():
    # prefill: one 100-token batch per stage time. decode: b seats in pp batches, each going round pp stages
    # once per token: pp=2 with 64 seats -> two batches of 32, a round trip 2 * (5 + 32) / 2 = 37 ms per token.
    cfg = SchedulerConfig(max_prefill_seqs=1, max_prefill_tokens=100, max_num_seqs=64)
    work = Workload([(100, 11)] * 4, np.arange(4.0), SLO(1, 1), cfg)
    prof = profile()
    prof.kv_capacity_tokens = {(1, 1): 10**6, (1, 2): 10**6}  # the seat limit binds, not the pool
    for pp, stage in ((1, 0.111), (2, 0.057)):
        assert capacity(prof, Layout("prefill", prefill=Parallel(1, pp)), work) == pytest.approx(1 / stage)
    assert capacity(prof, Layout("decode", decode=Parallel(1, 2)), work) == pytest.approx(64 / 0.037 / 10)
    assert capacity(prof, Layout("decode", decode=Parallel(1, 1)), work) == pytest.approx(64 / 0.069 / 10)


@pytest.mark.parametrize("layout", [
    Layout("disagg", prefill=Parallel(1, 2), decode=Parallel(1, 2)),
    Layout("colocated", colocated=Parallel(1, 2)),
    Layout("colocated", colocated=Parallel(1, 2), chunked=True),
])
def test_every_mode_runs_pipelined_without_losing_a_request(layout):
    rng = random.Random(0)
    arrivals = sorted(rng.uniform(0, 0.5) for _ in range(30))
    lengths = [(rng.randint(10, 300), rng.randint(2, 20)) for _ in range(30)]
    cfg = SchedulerConfig(chunk_budget=128, max_prefill_tokens=512)
    res = run(layout, arrivals, lengths, profile(1e9), cfg)
    assert all(r.finished for r in res)
    # a prompt crosses two stages: at least twice a stage's constant part (10 / 2 + 2 ms)
    assert min(r.ttft for r in res) >= 2 * 0.007
