"""--cluster ray on one machine: a Ray cluster of two simulated nodes (ray.cluster_utils.Cluster, one CPU each),
the prefill instance's actor on one node and the decode instance's on the other, so every hand-off crosses
nodes as a Ray object. The tokens must be the in-process engine's, to the bit; no KV block may leak; an actor
killed mid-decode fails its requests, frees their KV on the prefill side, shows on /health and is restarted.

One cluster for the module (starting one costs seconds); each test's engine starts its own actors.
"""
from __future__ import annotations

import asyncio
import glob
import os
import signal
import time

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (requirements.txt has it: make test installs it)")

from engine.args import EngineArgs  # noqa: E402
from engine.config import SamplingParams  # noqa: E402
from serving.engine import AsyncEngine  # noqa: E402
from serving.llm import LLM  # noqa: E402

CORES = sorted(os.sched_getaffinity(0))
TWO_NODES = dict(mode="disagg", prefill_devices=[f"node0/cpu:{CORES[0]}"],
                 decode_devices=[f"node1/cpu:{CORES[-1]}"], dtype="float32")
TEXT = ("Disaggregated serving splits the prefill phase, which is compute bound, from the decode phase, which is "
        "bound by memory bandwidth, and moves the key-value cache from one to the other. ") * 6


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_ipc_hand_off_between_actors_gives_the_in_process_tokens(ckpt):
    """Both actors on this machine's GPUs (one shared GPU, or two): the decode actor opens the prefill pool's CUDA
    IPC handle and copies device to device. Runs before the CPU cluster of the tests below exists."""
    import torch

    last = torch.cuda.device_count() - 1
    kw = dict(mode="disagg", prefill_devices=["cuda:0"], decode_devices=[f"cuda:{last}"], dtype="float32")
    prompts, _ = requests(ckpt)
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    with LLM(checkpoint=ckpt, **kw) as llm:
        want = [o.token_ids for o in llm.generate(prompts, greedy)]
    ray.init(num_cpus=4, num_gpus=last + 1, include_dashboard=False)
    try:
        with LLM(checkpoint=ckpt, cluster="ray", **kw) as llm:
            assert llm.engine.instances[0].handle.ipc is not None
            got = [o.token_ids for o in llm.generate(prompts, greedy)]
            llm.check()
    finally:
        ray.shutdown()
    assert got == want


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "object_store_memory": 100 * 2**20})
    c.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    c.wait_for_nodes()
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


def local(**kw) -> dict:
    """The layout as the in-process engine runs it: node names dropped."""
    return {**kw, "prefill_devices": [d.split("/")[1] for d in kw["prefill_devices"]],
            "decode_devices": [d.split("/")[1] for d in kw["decode_devices"]]}


def requests(ckpt) -> tuple[list[list[int]], list[SamplingParams]]:
    ids = ckpt.tokenizer.encode(TEXT)
    prompts = [ids[s:s + n] for s, n in ((0, 7), (5, 40), (11, 90), (3, 150), (20, 64), (9, 33))]
    kinds = [dict(temperature=0.0),
             dict(temperature=0.9, top_p=0.9, top_k=50, seed=11),
             dict(temperature=0.8, seed=12, repetition_penalty=1.3, presence_penalty=0.5, logprobs=3, min_tokens=4)]
    return prompts, [SamplingParams(max_tokens=24, ignore_eos=True, **kinds[i % 3]) for i in range(len(prompts))]


def test_two_nodes_give_the_in_process_tokens_and_leak_no_block(cluster, ckpt):
    # a decode pool too small for all six: requests are preempted, their KV swapped out and back in the actor
    kw = dict(TWO_NODES, decode_kv_blocks=24, step_trace=10_000)
    prompts, params = requests(ckpt)
    with LLM(checkpoint=ckpt, **local(**kw)) as llm:
        want = llm.generate(prompts, params)
    with LLM(checkpoint=ckpt, cluster="ray", ray_address=cluster.address, **kw) as llm:
        prefill, decode = llm.engine.instances
        assert prefill.node_id != decode.node_id and os.getpid() not in (prefill.pid, decode.pid)
        # Ray starts workers at nice 15; an instance runs at the server's priority, as a thread would
        assert os.getpriority(os.PRIO_PROCESS, prefill.pid) <= os.getpriority(os.PRIO_PROCESS, 0)
        got = llm.generate(prompts, params)
        llm.check()
        assert all(s.kv_blocks_used == 0 and s.state == "ok" for s in llm.engine.stats())
        swapped = sum(r.swap_tokens for r in llm.engine.step_trace.drain())
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == ["length"] * len(prompts)
    assert got[2].new_logprobs and got[2].new_logprobs == want[2].new_logprobs  # logprobs came back too
    assert all(o.metrics.transfer_bytes > 0 for o in got)  # every KV crossed nodes
    assert swapped > 0 and sum(o.metrics.preemptions for o in got) > 0
    assert not glob.glob("/dev/shm/distserve-kv-*")  # pools live unnamed: nothing left behind


async def _last(stream):
    last = None
    async for out in stream:
        last = out
    return last


def test_killed_decode_actor_fails_its_requests_frees_their_kv_and_comes_back(cluster, ckpt):
    config = EngineArgs(cluster="ray", ray_address=cluster.address, ray_max_restarts=1, **TWO_NODES).engine_config()
    prompts, _ = requests(ckpt)
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def body(engine: AsyncEngine) -> None:
        await engine.start()
        pre, dec = engine.slots
        streams = [asyncio.ensure_future(_last(engine.add_request(p, long))) for p in prompts[:4]]
        t0 = time.monotonic()
        while not any(len(r.output_ids) > 2 and r.kv_home is dec for r in engine.cluster.requests.values()):
            assert time.monotonic() - t0 < 120, "nothing reached decode"
            await asyncio.sleep(0.05)
        os.kill(engine.instances[1].pid, signal.SIGKILL)
        outs = await asyncio.wait_for(asyncio.gather(*streams), 60)
        assert [o.finish_reason for o in outs] == ["error"] * 4  # none hangs, none is cut silently
        stats = {s.instance: s for s in engine.stats()}
        assert stats["decode1"].state == "dead" and stats["prefill0"].state == "ok"
        assert stats["prefill0"].kv_blocks_used == 0  # the KV prefilled for decode1 was freed
        with pytest.raises(RuntimeError, match="no decode instance"):
            engine.add_request(prompts[0], short)
        while dec.state != "ok":  # Ray restarts the actor (ray_max_restarts=1): it rejoins dispatch
            assert time.monotonic() - t0 < 300, "the actor was not restarted"
            await asyncio.sleep(0.2)
        out = await asyncio.wait_for(_last(engine.add_request(prompts[1], short)), 120)
        assert out.finish_reason == "length" and len(out.token_ids) == 8
        engine.check()
        assert all(s.kv_blocks_used == 0 for s in engine.stats())

    async def main() -> None:
        engine = AsyncEngine(config, ckpt)
        try:
            await body(engine)
        finally:
            await engine.shutdown()

    asyncio.run(main())
