"""The engine's promise: the same tokens whatever the layout or load, and no KV block ever leaks.

Runs the real default model in float32 (bf16 batch-size-dependent rounding can flip near-ties).
"""
from __future__ import annotations

import asyncio
import os
import random
from collections import deque

import pytest
import torch

from engine.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig, parse_size
from engine.instance import WorkerDied
from engine.request import Status
from serving.engine import AsyncEngine
from serving.llm import LLM

CORES = sorted(os.sched_getaffinity(0))
C0, C1 = f"cpu:{CORES[0]}", f"cpu:{CORES[-1]}"
LAYOUTS = {
    "disagg-1p1d": dict(mode="disagg", prefill_devices=[C0], decode_devices=[C1]),
    "disagg-2p1d": dict(mode="disagg", prefill_devices=[C0, C1], decode_devices=[C1]),
    "colocated": dict(mode="colocated"),
    "chunked": dict(mode="colocated", chunked_prefill=True, chunk_budget=48),
}
TEXT = ("Disaggregated serving splits the prefill phase, which is compute bound, from the decode phase, which is "
        "bound by memory bandwidth. Each phase runs on its own device with its own batch sizes, and the key-value "
        "cache moves from one to the other after the first token. The scheduler picks a layout that maximizes "
        "goodput: the rate of requests that meet both latency objectives. ") * 8


@pytest.fixture(scope="module")
def prompts(ckpt):
    ids = ckpt.tokenizer.encode(TEXT)
    lengths = [1, 5, 17, 40, 64, 99, 150, 230, 310]
    starts = [0, 3, 11, 29, 50, 7, 90, 20, 0]
    return [ids[s:s + n] for s, n in zip(starts, lengths)]


def params(kind: str, i: int, max_tokens: int = 16) -> SamplingParams:
    if kind == "greedy":
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return SamplingParams(max_tokens=max_tokens, temperature=0.9, top_p=0.9, top_k=50, seed=1000 + i, ignore_eos=True)


def make_llm(ckpt, **kw) -> LLM:
    return LLM(dtype="float32", checkpoint=ckpt, **kw)


def assert_all_free(engine: AsyncEngine) -> None:
    engine.check()
    for s in engine.stats():
        assert s.kv_blocks_used == 0, s
        assert s.running == s.waiting == s.prefilling == s.migrating == s.swapped == 0, s
    assert not engine.cluster.requests and not engine.outputs.tracks


@pytest.fixture(scope="module")
def reference(ckpt, prompts):
    """Each prompt alone on a colocated instance."""
    with make_llm(ckpt) as llm:
        return {kind: [llm.generate([p], params(kind, i))[0].token_ids for i, p in enumerate(prompts)]
                for kind in ("greedy", "seeded")}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_give_the_tokens_of_a_request_alone(ckpt, prompts, reference, layout):
    with make_llm(ckpt, **LAYOUTS[layout]) as llm:
        for kind in ("greedy", "seeded"):
            outs = llm.generate(prompts, [params(kind, i) for i in range(len(prompts))])
            assert [o.token_ids for o in outs] == reference[kind], (layout, kind)
            assert all(o.finish_reason == "length" for o in outs)
        assert_all_free(llm.engine)
        if layout.startswith("disagg"):
            assert all(o.metrics.transfer_bytes > 0 and o.metrics.transfer_end >= o.metrics.transfer_start
                       for o in outs)


def test_phases_in_different_precisions_hand_off_and_free_everything(ckpt, prompts):
    """disagg with bf16 dense prefill and native decode (float32 activations): the hand-off widens the bf16 KV into
    the float32 pool, the first token is the bf16 prefill's, every request runs to its length and no block leaks."""
    from engine import kernels

    if not kernels.load():
        pytest.skip(f"native weights need the CPU kernels: {kernels.load_error()}")
    few = prompts[:5]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with LLM(dtype="bfloat16", weights="dense", checkpoint=ckpt) as bf16:
        firsts = [bf16.generate([p], SamplingParams(max_tokens=1, temperature=0.0))[0].token_ids[0] for p in few]
    with LLM(checkpoint=ckpt, dtype="bfloat16", weights="dense", decode_weights="native",  # decode dtype: auto
             **LAYOUTS["disagg-1p1d"]) as llm:
        pre, dec = (next(i for i in llm.engine.instances if i.role == r) for r in ("prefill", "decode"))
        assert (pre.model.native, pre.pool.cache.dtype) == (False, torch.bfloat16)
        assert (dec.model.native, dec.pool.cache.dtype) == (True, torch.float32)
        outs = llm.generate(few, sp)
        assert [o.token_ids[0] for o in outs] == firsts
        assert all(len(o.token_ids) == 8 and o.finish_reason == "length" for o in outs)
        assert all(o.metrics.transfer_bytes == -(-len(p) // pre.pool.block_size) * pre.pool.block_bytes
                   for o, p in zip(outs, few))
        assert_all_free(llm.engine)
    with pytest.raises(ValueError, match="disagg"):
        EngineConfig(decode_weights="native")


def run_engine(ckpt, config: EngineConfig, body):
    async def main():
        engine = AsyncEngine(config, ckpt)
        await engine.start()
        try:
            return await body(engine)
        finally:
            await engine.shutdown()
    return asyncio.run(main())


def disagg_config(decode_blocks: int | None = None, max_num_seqs: int = 64) -> EngineConfig:
    return EngineConfig(dtype="float32", mode="disagg", prefill_devices=[C0], decode_devices=[C1],
                        decode_cache=CacheConfig(num_blocks=decode_blocks) if decode_blocks else None,
                        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs))


async def collect(stream):
    last = None
    async for out in stream:
        last = out
    return last


def test_fifty_requests_at_random_times_match_each_alone(ckpt):
    rng = random.Random(7)
    ids = ckpt.tokenizer.encode(TEXT)
    prompts = [ids[(s := rng.randrange(0, 200)): s + rng.randrange(1, 120)] for _ in range(50)]
    with make_llm(ckpt) as llm:
        alone = [llm.generate([p], params("greedy", 0, 8))[0].token_ids for p in prompts]

    async def body(engine):
        async def one(i):
            await asyncio.sleep(rng.uniform(0, 1.0))
            return await collect(engine.add_request(prompts[i], params("greedy", 0, 8)))
        outs = await asyncio.gather(*(one(i) for i in range(50)))
        await asyncio.sleep(0.05)
        assert_all_free(engine)
        return [o.token_ids for o in outs]

    assert run_engine(ckpt, disagg_config(), body) == alone


@pytest.mark.parametrize("swap_space", ["4GiB", "0"])
def test_too_small_decode_pool_preempts_and_still_gives_right_tokens(ckpt, prompts, reference, swap_space):
    # 9 prompts need ~60 blocks of 16 tokens at once; the decode pool has 30: requests are preempted and
    # resume, by swapping their KV out and back while the host swap space allows, else by recomputing it
    config = disagg_config(decode_blocks=30)
    config.swap_space_bytes, config.step_trace = parse_size(swap_space), 10_000

    async def body(engine):
        outs = await asyncio.gather(*(collect(engine.add_request(p, params("greedy", i)))
                                      for i, p in enumerate(prompts)))
        assert_all_free(engine)
        return outs, engine.step_trace.drain()

    outs, trace = run_engine(ckpt, config, body)
    assert [o.token_ids for o in outs] == reference["greedy"]
    assert sum(o.metrics.preemptions for o in outs) > 0  # the scenario really exhausted the pool
    swapped = sum(r.swap_tokens for r in trace)
    assert swapped > 0 if swap_space == "4GiB" else swapped == 0  # no host room: recomputed instead


PHASES = [Status.WAITING, Status.PREFILLING, Status.MIGRATING, Status.PREEMPTED, Status.DECODING]


def test_abort_in_every_phase_frees_every_block(ckpt, prompts):
    """One crowd overfills a small decode pool so requests sit in every phase; abort one in each."""
    async def body(engine):
        crowd = [engine.add_request(p, params("greedy", i, 24), f"crowd{i}") for i, p in enumerate(prompts * 2)]
        tasks = [asyncio.create_task(collect(s)) for s in crowd]
        aborted: dict[Status, str] = {}
        for _ in range(40000):
            for req in list(engine.cluster.requests.values()):
                phase = req.status
                if phase in PHASES and phase not in aborted:
                    aborted[phase] = req.id
                    engine.abort(req.id)
            if len(aborted) == len(PHASES) or all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.0005)
        outs = await asyncio.gather(*tasks)
        await asyncio.sleep(0.05)
        assert_all_free(engine)
        return aborted, outs

    aborted, outs = run_engine(ckpt, disagg_config(decode_blocks=40, max_num_seqs=8), body)
    assert set(aborted) == set(PHASES), f"phases never reached: {set(PHASES) - set(aborted)}"
    for o in outs:
        assert o.finish_reason == ("abort" if o.request_id in aborted.values() else "length"), o.request_id


def test_random_aborts_leave_no_blocks_and_others_finish(ckpt, prompts):
    rng = random.Random(3)

    async def body(engine):
        streams = {f"r{i}": engine.add_request(prompts[i % len(prompts)], params("greedy", i, 20), f"r{i}")
                   for i in range(24)}
        tasks = {k: asyncio.create_task(collect(s)) for k, s in streams.items()}
        victims = rng.sample(sorted(streams), 12)
        for v in victims:
            await asyncio.sleep(rng.uniform(0, 0.3))
            engine.abort(v)
        outs = {k: await t for k, t in tasks.items()}
        await asyncio.sleep(0.05)
        assert_all_free(engine)
        return victims, outs

    victims, outs = run_engine(ckpt, disagg_config(decode_blocks=40, max_num_seqs=8), body)
    for k, o in outs.items():
        assert o.finish_reason == ("abort" if k in victims and o.finish_reason == "abort" else "length")
    assert sum(o.finish_reason == "abort" for o in outs.values()) >= 6  # most victims were still running


def test_streams_carry_deltas_and_nothing_outlives_a_request(ckpt, prompts):
    """Each update carries only what is new (no copy of the whole output per token); the caller's params
    are left as they were; once requests end, the engine holds nothing of them."""
    def held(engine) -> int:  # everything the engine could accumulate per request
        parts = [engine, engine.cluster, engine.outputs] + [s.policy for s in engine.slots]
        return sum(len(v) for p in parts for v in vars(p).values() if isinstance(v, (list, dict, set, deque))
                   and v not in (engine.instances, engine.slots, engine.cluster.slots,
                                 engine.cluster.entry, engine.cluster.decoders))

    async def body(engine):
        before = held(engine)
        shared = SamplingParams(max_tokens=None, temperature=0.0)
        for i, p in enumerate(prompts[1:4]):
            engine.add_request(p, shared, f"never-read{i}")
            engine.abort(f"never-read{i}")
        assert shared.max_tokens is None  # the engine filled in its own copy
        streams = [engine.add_request(prompts[4], params("greedy", 0, 12))]
        updates = [out async for out in streams[0]]
        await asyncio.sleep(0.05)
        assert held(engine) == before
        return updates

    updates = run_engine(ckpt, disagg_config(), body)
    final = updates[-1]
    assert final.finished and len(final.token_ids) == final.num_tokens > 1
    assert all(u.token_ids is None and u.text is None for u in updates[:-1])
    assert [t for u in updates for t in u.new_token_ids] == final.token_ids
    assert "".join(u.new_text for u in updates) == final.text


def test_bad_requests_are_rejected_with_a_reason(ckpt):
    async def body(engine):
        with pytest.raises(ValueError, match="empty"):
            engine.add_request([], SamplingParams())
        with pytest.raises(ValueError, match="context window"):
            engine.add_request([1] * 10, SamplingParams(max_tokens=engine.max_model_len))
        with pytest.raises(ValueError, match="out of range"):
            engine.add_request([10**9], SamplingParams())
        assert_all_free(engine)

    run_engine(ckpt, disagg_config(), body)


def test_step_trace_records_every_step_shape_and_iteration(ckpt, prompts):
    """What the planner fits in-server (scheduler/trace_fit.py): each prompt token once in a prefill
    record, each later token once in a decode record, iteration times from the loop's own clock."""
    config = disagg_config()
    config.step_trace = 1000

    async def body(engine):
        outs = await asyncio.gather(*(collect(engine.add_request(p, params("greedy", i, 6)))
                                      for i, p in enumerate(prompts)))
        await asyncio.sleep(0.05)
        return outs, engine.step_trace.drain(), engine.step_trace.drain()

    outs, trace, again = run_engine(ckpt, config, body)
    assert again == []  # drained
    pre = [r for r in trace if r.role == "prefill"]
    dec = [r for r in trace if r.role == "decode"]
    assert len(pre) + len(dec) == len(trace)
    assert sorted(n for r in pre for n, _ in r.prefill) == sorted(len(p) for p in prompts)
    assert all(c == 0 for r in pre for _, c in r.prefill) and not any(r.decode_batch for r in pre)
    assert not any(r.prefill for r in dec)
    assert sum(r.decode_batch for r in dec) == sum(len(o.token_ids) - 1 for o in outs) == 5 * len(prompts)
    # a decode step's context: each request's prompt plus the tokens it has so far
    assert min(r.decode_ctx for r in dec) >= min(len(p) for p in prompts) + 1
    assert all(r.end >= r.start and isinstance(r.others_busy, bool) for r in trace)
    for role in ("prefill", "decode"):  # one instance's iterations never overlap
        rs = sorted((r for r in trace if r.role == role), key=lambda r: r.start)
        assert all(a.end <= b.start for a, b in zip(rs, rs[1:]))


def test_a_worker_that_dies_fails_its_step_and_the_others_go_on(ckpt, prompts, reference):
    """What happens when a Ray actor dies (tests/test_ray.py kills a real one), on in-process workers: the step
    it was running fails with an error, the instance leaves dispatch for good, the rest are served elsewhere."""
    config = EngineConfig(dtype="float32", mode="colocated", devices=[C0, C1])

    async def dies(step):
        raise WorkerDied("colocated0", "killed by the test")

    async def body(engine):
        engine.instances[0].execute = dies
        outs = await asyncio.gather(*(collect(engine.add_request(p, params("greedy", i)))
                                      for i, p in enumerate(prompts[:4])))
        assert {o.finish_reason for o in outs} == {"error", "length"}
        state = {s.instance: s.state for s in engine.stats()}
        assert state == {"colocated0": "dead", "colocated1": "ok"}
        later = await asyncio.gather(*(collect(engine.add_request(p, params("greedy", i)))
                                       for i, p in enumerate(prompts[:4])))
        assert [o.token_ids for o in later] == reference["greedy"][:4]
        assert_all_free(engine)

    run_engine(ckpt, config, body)
