"""The runtime policies and the Cluster as plain Python: requests, blocks and steps, no model.

A step's results are faked (token 0 for every request that samples); what is checked is what the
policies and the Cluster decide and how they keep blocks: every scenario ends with the allocators'
integrity check and, once all requests are done, every block free.
"""
from __future__ import annotations

import pytest

from engine.config import SamplingParams, SchedulerConfig
from engine.kv_cache import BlockAllocator
from engine.request import Request, Status
from engine.step import Sampled, Step
from engine.stop import StopRule
from scheduler.runtime.cluster import Cluster, Execute, Slot
from scheduler.runtime.decode import DecodeScheduler
from scheduler.runtime.lifecycle import Finished, HandOff, Preempted, Token
from scheduler.runtime.policy import make_policy, queue_counts
from scheduler.runtime.prefill import PrefillScheduler

RULE = StopRule(frozenset({2}), max_model_len=10_000)


def req(rid: str, prompt: int, max_tokens: int = 4) -> Request:
    return Request(rid, [5] * prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival=0.0)


def sampled(step: Step) -> list[Sampled]:
    return [Sampled(r, 0) for r, n in step.items if r.num_computed + n >= r.num_tokens]


def test_allocator_hands_out_lowest_ids_and_refuses_double_free():
    a = BlockAllocator(8, 16)
    t1 = a.allocate("a", 3)
    t2 = a.allocate("b", 2)
    assert t1 == [0, 1, 2] and t2 == [3, 4] and a.num_free == 3
    a.free(t1)
    assert a.allocate("c", 2) == [0, 1]
    assert not a.append("b", t2, 16 * 9) and t2 == [3, 4]  # not enough: no change
    with pytest.raises(RuntimeError, match="double free"):
        a.free([7])
    a.check()


def test_prefill_is_fcfs_within_token_budget_and_holds_blocks_until_handed_off():
    alloc = BlockAllocator(6, 16)
    p = PrefillScheduler(SchedulerConfig(max_prefill_tokens=64), alloc, RULE)
    rs = [req("a", 40), req("b", 20), req("c", 40)]
    for r in rs:
        p.add(r)
    step = p.schedule()
    assert step.requests == rs[:2]  # 40 + 20 tokens fit the budget; c would make 100
    assert p.schedule().requests == []  # c needs 3 blocks, 1 is free: it waits (backpressure), nothing skips it
    assert queue_counts(p).waiting == 1 and queue_counts(p).prefilling == 2
    events = p.complete(step, sampled(step), now=1.0)
    assert [type(e) for e in events] == [Token, Token, HandOff, HandOff] and rs[0].status is Status.MIGRATING
    assert len(rs[0].block_table) == 3  # kept until the decode side pulls it
    assert p.schedule().requests == []  # still held: only a pull frees them
    alloc.free(rs[0].block_table)
    assert p.schedule().requests == [rs[2]]
    alloc.check()


def test_prefill_step_shows_as_prefilling_not_waiting():
    p = PrefillScheduler(SchedulerConfig(), BlockAllocator(8, 16), RULE)
    p.add(req("a", 30))
    p.add(req("b", 10_000))  # cannot fit: stays waiting
    p.schedule()
    assert queue_counts(p) == queue_counts(p).__class__(waiting=1, prefilling=1)


def test_first_token_that_finishes_a_request_is_not_handed_off():
    p = PrefillScheduler(SchedulerConfig(), BlockAllocator(8, 16), RULE)
    r = req("a", 10, max_tokens=1)
    p.add(r)
    step = p.schedule()
    events = p.complete(step, sampled(step), now=1.0)
    assert [type(e) for e in events] == [Token, Finished] and events[1].reason == "length"


def _decode_with(blocks: int, swap_blocks: int | None, n: int = 3, prompt: int = 30) -> tuple[DecodeScheduler, list]:
    alloc = BlockAllocator(blocks, 16)
    d = DecodeScheduler(SchedulerConfig(), alloc, RULE, swap_blocks)
    rs = []
    for i in range(n):  # prefilled in this pool (colocated-style): 2 blocks each
        r = req(f"r{i}", prompt, max_tokens=20)
        r.num_computed, r.output_ids = prompt, [0]
        r.block_table = alloc.allocate(r.id, alloc.blocks_for(r.num_tokens))
        d.add_running(r)
        rs.append(r)
    return d, rs


def _decode_until_preempted(d: DecodeScheduler) -> Step:
    for _ in range(40):
        step = d.schedule()
        if step.swap_out or d.swapped:
            return step
        d.complete(step, sampled(step), now=0.0)
    raise AssertionError("never preempted")


def test_preemption_swaps_the_newest_while_host_swap_space_allows():
    d, rs = _decode_with(blocks=6, swap_blocks=None)
    step = _decode_until_preempted(d)
    assert [r for r, _ in step.swap_out] == [rs[-1]] and rs[-1].status is Status.PREEMPTED
    assert d.host_blocks_used == len(step.swap_out[0][1]) and rs[-1].num_computed > 0


def test_preemption_recomputes_when_swap_space_is_exhausted():
    d, rs = _decode_with(blocks=6, swap_blocks=0)
    step = _decode_until_preempted(d)
    victim = rs[-1]
    assert step.swap_out == [] and d.host_blocks_used == 0
    assert victim.status is Status.PREEMPTED and victim.num_computed == 0 and victim.block_table == []
    d.remove(rs[0])  # room again: the victim resumes by recomputing its prompt and outputs in one chunk
    d.allocator.free(rs[0].block_table)
    step = d.schedule()
    assert (victim, victim.num_tokens) in step.items and step.swap_in == []
    d.allocator.check()


def test_host_swap_space_is_a_hard_bound():
    d, rs = _decode_with(blocks=9, swap_blocks=1, n=4)  # a victim holds 2 blocks: more than the host room
    step = _decode_until_preempted(d)
    assert step.swap_out == [] and d.host_blocks_used <= 1


def _cluster(roles: list[str], blocks: int, sched: SchedulerConfig | None = None):
    slots = []
    for i, role in enumerate(roles):
        alloc = BlockAllocator(blocks, 16)
        slots.append(Slot(f"{role}{i}", role, make_policy(role, sched or SchedulerConfig(), alloc, RULE), alloc))
    ended: list[tuple[str, str]] = []

    class Sink:
        def on_token(self, event: Token) -> str | None:
            return None

        def on_finish(self, r: Request, reason: str) -> None:
            ended.append((r.id, reason))
    return Cluster(slots, lambda: 0.0, lambda slot: None, Sink()), ended


def _run(cluster: Cluster, abort_after: dict[str, int] | None = None, max_rounds: int = 200) -> None:
    """Drive every slot until nothing is left to do; abort request ids after the given round."""
    for rnd in range(max_rounds):
        for rid, when in (abort_after or {}).items():
            if when == rnd:
                cluster.abort(rid)
        progressed = False
        for slot in cluster.slots:
            action = cluster.next_action(slot)
            if action is None:
                continue
            progressed = True
            if isinstance(action, Execute):
                cluster.executed(slot, action.step, sampled(action.step))
            else:
                for pull in action:
                    cluster.pulled(pull, pull.req.num_computed)
        if not progressed and not cluster.requests:
            return
    raise AssertionError(f"requests left: {list(cluster.requests)}")


def test_disaggregated_cluster_serves_everything_and_frees_every_block():
    cluster, ended = _cluster(["prefill", "decode"], blocks=8)
    for i in range(6):
        cluster.add(req(f"r{i}", 20 + 10 * i, max_tokens=5))
    _run(cluster)
    assert sorted(ended) == [(f"r{i}", "length") for i in range(6)]
    cluster.check()
    assert all(s.allocator.num_used == 0 for s in cluster.slots)


@pytest.mark.parametrize("when", range(6))
def test_abort_at_any_moment_frees_both_sides(when):
    cluster, ended = _cluster(["prefill", "decode"], blocks=8)
    for i in range(4):
        cluster.add(req(f"r{i}", 40, max_tokens=6))
    _run(cluster, abort_after={"r1": when, "r3": when})
    assert dict(ended)["r0"] == "length" and dict(ended)["r2"] == "length"
    assert dict(ended)["r1"] in ("abort", "length") and dict(ended)["r3"] in ("abort", "length")
    cluster.check()
    assert all(s.allocator.num_used == 0 for s in cluster.slots) and not cluster.pending


def test_a_failed_step_ends_its_requests_and_frees_their_blocks():
    cluster, ended = _cluster(["colocated"], blocks=8)
    for i in range(2):
        cluster.add(req(f"r{i}", 20))
    slot = cluster.slots[0]
    assert isinstance(cluster.next_action(slot), Execute)
    failed = cluster.failed(slot, "error")
    assert sorted(r.id for r in failed) == ["r0", "r1"] and sorted(ended) == [("r0", "error"), ("r1", "error")]
    assert slot.allocator.num_used == 0 and not slot.busy


def test_a_step_event_stream_is_tokens_then_finish_and_preemptions_are_reported():
    d, rs = _decode_with(blocks=6, swap_blocks=None)
    for _ in range(40):
        step = d.schedule()
        events = d.complete(step, sampled(step), now=0.0)
        if step.swap_out:
            assert Preempted(rs[-1]) in events
            return
    raise AssertionError("never preempted")
