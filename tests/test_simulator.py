"""The simulator against timelines computed by hand, with round latency coefficients.

Prefill (tp1): 10 + 1*tokens (+ c*tokens^2) ms, +1 ms (DistServe's pp term at pp=1).
Decode: a + b*context + c*batch ms. KV: 1000 bytes per token.
"""
from __future__ import annotations

import pytest

from engine.config import SchedulerConfig
from scheduler.planner.latency import PhaseCoeffs, Profile, phases
from scheduler.planner.simulator import Layout, Parallel, Simulation, simulate
from scheduler.planner.workload import SLO


def profile(prefill=(10, 1, 0), decode=(5, 0.01, 1), decode2=(4, 0, 1), cap=None, transfer=1e7, swap=1e6):
    return Profile(model="toy", device="toy", device_kind="cuda",
                   tp={1: PhaseCoeffs(prefill, decode, decode, threshold=1000),
                       2: PhaseCoeffs(prefill, decode2, decode2, threshold=1000)},
                   kv_capacity_tokens=cap or {(1, 1): 1600, (2, 1): 1600}, kv_bytes_per_token=1000,
                   transfer_bandwidth_Bps=transfer, swap_bandwidth_Bps=swap, block_size=16)


def run(prof, layout, arrivals, lengths, cfg=None, slo=None):
    sim = Simulation(prof, layout, cfg or SchedulerConfig(), slo)
    res = sim.run(arrivals, lengths)
    sim.check()  # every pool's allocator is consistent, and everything was freed
    for slot in sim.slots:
        assert slot.allocator.num_free == slot.allocator.num_blocks
    return res


def burst(n: int) -> list[float]:
    """n arrivals a nanosecond apart: the first one starts alone. (Requests that arrive at the very same
    instant are batched together, as the engine's idle loop gathers a burst: see the last test.)"""
    return [i * 1e-9 for i in range(n)]


DISAGG = Layout("disagg", prefill=Parallel(1), decode=Parallel(1))


def test_one_request_disagg():
    res = run(profile(), DISAGG, [0.0], [(100, 5)]).requests[0]
    # prefill 10 + 100 + 1 = 111 ms; pull 100 tokens * 1000 B / 1e7 B/s = 10 ms;
    # 4 decode steps at contexts 101..104: 5 + 0.01*ctx + 1 = 7.01, 7.02, 7.03, 7.04 ms
    assert res.ttft == pytest.approx(0.111)
    assert res.transfer_time == pytest.approx(0.010)
    assert res.tpot == pytest.approx((0.121 + 0.0281 - 0.111) / 4)
    assert res.finished and res.preemptions == 0


def test_phases_in_two_precisions_are_priced_each_from_its_own_profile():
    """A server whose decode instances run another precision (--decode-weights): the planner's --decode-profile
    prices decode steps, the decode pools' KV capacity and the decode phase's interference from that profile,
    and prefill, the hand-off and the rest from the prefill's."""
    pre, dec = profile(), profile(prefill=(99, 9, 0), decode=(2, 0.01, 1), cap={(1, 1): 800, (2, 1): 800})
    pre.interference, dec.interference = {"prefill": 1.5, "decode": 7.0}, {"prefill": 7.0, "decode": 1.25}
    both = phases(pre, dec)
    assert both.interference == {"prefill": 1.5, "decode": 1.25}
    assert (both.kv_capacity(1, 1), both.kv_capacity(1, 1, "decode")) == (1600, 800)
    sim = Simulation(both, DISAGG, SchedulerConfig())
    assert [s.allocator.num_blocks for s in sim.slots] == [100, 50]  # 1600 and 800 tokens of 16-token blocks
    res = run(both, DISAGG, [0.0], [(100, 5)]).requests[0]
    # prefill as the prefill profile's (111 ms), pull 10 ms, 4 decode steps at the decode profile's 2 + 0.01*ctx + 1
    assert res.ttft == pytest.approx(0.111)
    assert res.tpot == pytest.approx((0.121 + (4.01 + 4.02 + 4.03 + 4.04) / 1e3 - 0.111) / 4)


def test_prefill_queue_batches_by_token_budget():
    # quadratic term 0.001*l^2: one 100-token prompt = 10+100+10+1 = 121 ms, two = 10+200+20+1 = 231 ms.
    # The first arrival starts alone at t=0; the other four (same instant) queue and go two by two
    # under a 200-token budget.
    prof = profile(prefill=(10, 1, 0.001))
    cfg = SchedulerConfig(max_prefill_tokens=200)
    res = run(prof, Layout("prefill", prefill=Parallel(1)), burst(5), [(100, 8)] * 5, cfg)
    assert [r.ttft for r in res.requests] == pytest.approx([0.121, 0.352, 0.352, 0.583, 0.583])
    # the sequence limit binds the same way
    cfg = SchedulerConfig(max_prefill_seqs=1)
    res = run(prof, Layout("prefill", prefill=Parallel(1)), burst(3), [(100, 8)] * 3, cfg)
    assert [r.ttft for r in res.requests] == pytest.approx([0.121, 0.242, 0.363])


def test_full_decode_pool_backpressures_prefill():
    # prefill pool 4 blocks (two 32-token prompts), decode pool 3 blocks (one request at a time).
    # prefill: 10 + 0 + 1 = 11 ms flat; decode (tp2): 4 + 1*batch = 5 ms; pull: 32 tokens = 20 ms.
    prof = profile(prefill=(10, 0, 0), cap={(1, 1): 64, (2, 1): 48}, transfer=1.6e6)
    lay = Layout("disagg", prefill=Parallel(1), decode=Parallel(2))
    res = run(prof, lay, burst(3), [(32, 3)] * 3).requests
    # r0: prefill 0-11, pull 11-31, decode 31-36-41.  r1: prefill 11-22 (r0 still holds 2 blocks),
    # waits for the decode pool, pull 41-61, decode 61-66-71.  r2 cannot start prefill until r0's
    # pull frees its prefill blocks at 31: prefill 31-42, pull 71-91, decode 91-96-101.
    assert [r.ttft for r in res] == pytest.approx([0.011, 0.022, 0.042])
    assert res[2].prefill_start == pytest.approx(0.031)
    assert [r.tpot for r in res] == pytest.approx([0.015, 0.0245, 0.0295])


def test_decode_pool_overflow_swaps_out_the_newest():
    # decode-only: two prefilled requests (15 + 20 out) into a 5-block pool; steps 10 ms flat;
    # swapping 1 ms per token. r0 steps alone once (0-10 ms), then both run; at the 18th joint step
    # r1 needs its 3rd block (r0 holds 3, r1 2): r1 is swapped out (32 tokens: +32 ms) while r0
    # finishes (step ends 180 + 42 = 222 ms); r1 swaps back in (+32 ms) and finishes at 264 + 10.
    prof = profile(decode=(10, 0, 0), cap={(1, 1): 80, (2, 1): 80}, transfer=1e15, swap=1e6)
    res = run(prof, Layout("decode", decode=Parallel(1)), burst(2), [(15, 20)] * 2).requests
    assert res[0].tpot == pytest.approx(0.222 / 19, abs=1e-9)
    assert res[1].tpot == pytest.approx(0.274 / 19, abs=1e-9)
    assert [r.preemptions for r in res] == [0, 1]


def test_colocated_prefill_first_stalls_decodes():
    # r0 prefills 0-111; r1 (arrived at 5 ms) prefills 111-222 while r0 waits (interference);
    # one joint decode step 5 + 2 = 7 ms (r1 done), then r0 alone 6 ms.
    lay = Layout("colocated", colocated=Parallel(1))
    res = run(profile(decode=(5, 0, 1)), lay, [0.0, 0.005], [(100, 3), (100, 2)]).requests
    assert [r.ttft for r in res] == pytest.approx([0.111, 0.217])
    assert [r.tpot for r in res] == pytest.approx([(0.235 - 0.111) / 2, 0.007])


def test_colocated_chunked_prefill_splits_by_budget():
    # budget 64: chunk 64 (10 + 64 + 0.001*64^2 + 1) then 36 after 64 cached (10 + 36 + 0.001*(36^2 +
    # 2*36*64) + 1): 79.096 + 52.904 = 132 ms, the whole prompt's 121 ms plus one more a + pp.
    lay = Layout("colocated", colocated=Parallel(1), chunked=True)
    res = run(profile(prefill=(10, 1, 0.001)), lay, [0.0], [(100, 2)], SchedulerConfig(chunk_budget=64))
    assert res.requests[0].ttft == pytest.approx(0.132)


def test_attainment_and_early_stop():
    lengths = [(100, 5)] * 4
    slo = SLO(ttft=0.2, tpot=0.1, attainment=0.5)
    res = simulate(profile(), DISAGG, [0.0, 1.0, 2.0, 3.0], lengths, slo)
    assert res.joint_attainment == 1.0
    # all at once: r0 alone (0.111 s), then the other three in one batch (10 + 300 + 1 ms: 0.422 s)
    res = simulate(profile(), DISAGG, burst(4), lengths, SLO(ttft=0.15, tpot=0.1))
    assert res.attainment(True, False) == 0.25 and res.attainment(False, True) == 1.0
    stopped = simulate(profile(), DISAGG, burst(4), lengths, SLO(ttft=0.15, tpot=0.1), max_failures=1)
    assert stopped.stopped_early and stopped.joint_attainment <= 0.5


def test_request_larger_than_a_pool_is_refused():
    with pytest.raises(ValueError, match="cannot hold"):
        simulate(profile(cap={(1, 1): 64, (2, 1): 64}), DISAGG, [0.0], [(100, 5)])


def test_layout_validation():
    with pytest.raises(ValueError):
        Layout("disagg", prefill=Parallel(1))
    with pytest.raises(ValueError):
        Layout("disagg", prefill=Parallel(1), decode=Parallel(1), chunked=True)
    assert Layout("disagg", prefill=Parallel(2, 1, 2), decode=Parallel(1, 2, 1)).devices == 6


def test_step_noise_multiplies_each_step_by_a_measured_draw():
    """Profile.step_noise: the measured / modelled times of a server's traced steps; the simulator prices
    each step at the model times one of them, drawn with its seed. A single multiplier scales every step."""
    import dataclasses

    lone = [(100, 5)]
    base = run(profile(), DISAGG, [0.0], lone).requests[0]
    doubled = run(dataclasses.replace(profile(), step_noise={"prefill": (2.0,), "decode": (2.0,)}), DISAGG, [0.0],
                  lone).requests[0]
    assert doubled.ttft == pytest.approx(2 * base.ttft)  # prefill 111 ms -> 222 ms
    # TPOT: the 10 ms pull (not a step) and then the 4 decode steps (28.1 ms in all, doubled)
    assert base.tpot == pytest.approx((0.010 + 0.0281) / 4) and doubled.tpot == pytest.approx((0.010 + 0.0562) / 4)
    # a multiplier of 1 is the deterministic model; the draws are reproducible by seed and differ across seeds
    same = dataclasses.replace(profile(), step_noise={"decode": (1.0,)})
    assert run(same, DISAGG, [0.0], lone).requests[0].tpot == pytest.approx(base.tpot)
    noisy = dataclasses.replace(profile(), step_noise={"prefill": (0.5, 1.5), "decode": (0.5, 1.5)})
    arrivals, lengths = [i * 0.05 for i in range(40)], [(100, 20)] * 40
    a, b = (simulate(noisy, DISAGG, arrivals, lengths, seed=s) for s in (0, 0))
    c = simulate(noisy, DISAGG, arrivals, lengths, seed=1)
    assert [r.ttft for r in a.requests] == [r.ttft for r in b.requests]
    assert [r.ttft for r in a.requests] != [r.ttft for r in c.requests]


def test_step_noise_lengthens_queues_at_the_same_mean_step_time():
    """Multipliers with mean 1 leave the mean step as modelled, yet a loaded prefill queue waits longer when
    steps vary (Pollaczek-Khinchine): what a deterministic simulator misses near capacity."""
    import dataclasses
    import statistics

    prof = profile()  # a 100-token prefill: 111 ms alone
    arrivals = [i * 0.115 for i in range(200)]  # ~97% of one prefill instance's capacity
    lengths = [(100, 2)] * 200
    flat = simulate(prof, Layout("prefill", prefill=Parallel(1)), arrivals, lengths)
    noisy = simulate(dataclasses.replace(prof, step_noise={"prefill": (0.6, 1.4)}),
                     Layout("prefill", prefill=Parallel(1)), arrivals, lengths)
    assert statistics.mean(r.ttft for r in noisy.requests) > 1.5 * statistics.mean(r.ttft for r in flat.requests)


def test_an_arrival_stalls_the_steps_in_flight():
    """Profile.arrival_stall_ms: a request that arrives while a step runs makes that step end later (a CPU
    server's front end shares the process, its GIL and cores with the instances); a step started after it is not."""
    import dataclasses

    stalled = dataclasses.replace(profile(), arrival_stall_ms={"prefill": 5.0, "decode": 3.0})
    lay = Layout("prefill", prefill=Parallel(1))
    # r0 prefills 0-111 ms; r1 arrives at 50 ms, inside it: r0 ends at 116, r1 runs 116-227 (TTFT 177 ms)
    res = run(stalled, lay, [0.0, 0.05], [(100, 2)] * 2).requests
    assert [r.ttft for r in res] == pytest.approx([0.116, 0.177])
    # disagg: r0 prefills 0-111, pulls 111-121, decodes from 121 (7.01 ms steps); r1 arrives at 125 ms inside
    # r0's first decode step (+3 ms: the decode stall) while the prefill instance is idle (nothing stalled)
    base = run(profile(), DISAGG, [0.0, 0.125], [(100, 5), (100, 2)]).requests
    res = run(stalled, DISAGG, [0.0, 0.125], [(100, 5), (100, 2)]).requests
    assert res[0].ttft == pytest.approx(0.111) and res[1].ttft == pytest.approx(0.111)
    assert base[0].tpot == pytest.approx((0.010 + 0.0281) / 4)
    assert res[0].tpot == pytest.approx((0.010 + 0.0281 + 0.003) / 4)
    # a profile without stalls (DistServe's) leaves arrivals free
    assert run(profile(), lay, [0.0, 0.05], [(100, 2)] * 2).requests[0].ttft == pytest.approx(0.111)


def test_an_arrival_stalls_every_stage_of_a_pipelined_instance():
    """pp=2: stage time (10 + 100) / 2 + 2 = 57 ms. r1 arrives at 10 ms while r0 holds stage 1: both of r0's
    stages move 5 ms later (stage 1 free at 62, r0 done at 119); r1 enters stage 1 at 62 and is done at 176."""
    import dataclasses

    prof = dataclasses.replace(profile(cap={(1, 2): 3200, (1, 1): 1600, (2, 1): 1600}),
                               arrival_stall_ms={"prefill": 5.0})
    res = run(prof, Layout("prefill", prefill=Parallel(1, 2)), [0.0, 0.010], [(100, 2)] * 2).requests
    assert [r.ttft for r in res] == pytest.approx([0.119, 0.166])
