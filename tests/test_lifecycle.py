"""The engine and the simulator run one step lifecycle (scheduler/runtime/cluster.py).

The real AsyncEngine (a tiny random model, real forwards and KV copies) runs on a virtual clock whose
executors take exactly the time the simulator's pricer gives each step and pull; the simulator runs the
same workload under the same profile. Both must produce the same events (each token, each finish) at the
same times, in every layout, through backpressure and preemption.
"""
from __future__ import annotations

import asyncio
import random

import pytest

from engine.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from engine.loader import Checkpoint
from engine.request import Request
from engine.step import Step
from scheduler.planner.latency import PhaseCoeffs, Profile
from scheduler.planner.simulator import Layout, Parallel, Pricer, Simulation
from scheduler.runtime.cluster import Pull
from scheduler.runtime.lifecycle import Token
from serving.engine import AsyncEngine
from tests.helpers import TinyTokenizer, hf_model, tiny_config
from tests.virtual_time import VirtualExecutor, VirtualLoop

BLOCK = 16
COEFFS = PhaseCoeffs((10.0, 0.5, 0.001), (5.0, 0.01, 1.0), (5.0, 0.01, 1.0), threshold=1000)


def profile(blocks: int) -> Profile:
    return Profile("tiny", "virtual", "cpu", {1: COEFFS}, {(1, 1): blocks * BLOCK}, kv_bytes_per_token=1000,
                   transfer_bandwidth_Bps=2e6, swap_bandwidth_Bps=1e6, block_size=BLOCK)


class Recorder:
    """Wraps a Cluster's sink: (time, event, request id, tokens so far) of every token and finish."""

    def __init__(self, inner, clock) -> None:
        self.inner, self.clock, self.log = inner, clock, []

    def on_token(self, event: Token) -> str | None:
        self.log.append((round(self.clock(), 9), "token", event.req.id, len(event.req.output_ids)))
        return self.inner.on_token(event)

    def on_finish(self, req: Request, reason: str) -> None:
        self.log.append((round(self.clock(), 9), "finish:" + reason, req.id, len(req.output_ids)))
        self.inner.on_finish(req, reason)


def workload(n: int = 12, seed: int = 0) -> tuple[list[float], list[tuple[int, int]]]:
    rng = random.Random(seed)
    arrivals = sorted(rng.uniform(0, 0.4) for _ in range(n))
    return arrivals, [(rng.randint(5, 80), rng.randint(2, 12)) for _ in range(n)]


def run_engine(layout: Layout, blocks: int, sched: SchedulerConfig, arrivals, lengths) -> list[tuple]:
    cfg = tiny_config()
    ckpt = Checkpoint(cfg, hf_model(cfg).state_dict(), TinyTokenizer(), "tiny")
    if layout.mode == "disagg":
        devices = dict(mode="disagg", prefill_devices=["cpu"] * layout.prefill.count,
                       decode_devices=["cpu"] * layout.decode.count)
    else:
        devices = dict(mode="colocated", devices=["cpu"] * layout.colocated.count, chunked_prefill=layout.chunked)
    config = EngineConfig(dtype="float32", cache=CacheConfig(num_blocks=blocks, block_size=BLOCK), scheduler=sched,
                          **devices)
    loop = VirtualLoop()
    engine = AsyncEngine(config, ckpt, clock=loop.time)
    pricer = Pricer(profile(blocks), {s.name: profile(blocks).model_for(1, 1) for s in engine.slots})

    def price_for(slot_name: str):
        def price(fn, args) -> float:
            if isinstance(args[0], Step):
                return pricer.step_seconds(slot_name, args[0], others_busy=False)
            assert isinstance(args[0], Pull)
            return pricer.pull_seconds(args[0])
        return price

    for inst in engine.instances:
        inst.executor = VirtualExecutor(loop, price_for(inst.name))
    rec = engine.cluster.sink = Recorder(engine.cluster.sink, loop.time)
    rng = random.Random(1)

    async def main():
        await engine.start()

        async def one(i: int, t: float, p: int, o: int):
            await asyncio.sleep(t - loop.time())
            params = SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0)
            async for _ in engine.add_request([rng.randrange(cfg.vocab_size) for _ in range(p)], params, str(i),
                                              arrival=loop.time()):
                pass
        await asyncio.gather(*(one(i, t, p, o) for i, (t, (p, o)) in enumerate(zip(arrivals, lengths))))
        engine.check()
        assert all(s.allocator.num_used == 0 for s in engine.slots)
        await engine.shutdown()

    loop.run_until_complete(main())
    loop.close()
    return rec.log


def run_sim(layout: Layout, blocks: int, sched: SchedulerConfig, arrivals, lengths) -> list[tuple]:
    sim = Simulation(profile(blocks), layout, sched)
    rec = sim.cluster.sink = Recorder(sim.cluster.sink, lambda: sim.now)
    sim.run(arrivals, lengths)
    sim.check()
    return rec.log


CASES = {
    "disagg": (Layout("disagg", prefill=Parallel(1), decode=Parallel(1)), 64, SchedulerConfig()),
    "disagg-2p1d-backpressure": (Layout("disagg", prefill=Parallel(1, count=2), decode=Parallel(1)), 12,
                                 SchedulerConfig(max_prefill_tokens=96)),
    "disagg-preempting": (Layout("disagg", prefill=Parallel(1), decode=Parallel(1)), 7, SchedulerConfig()),
    "colocated": (Layout("colocated", colocated=Parallel(1)), 64, SchedulerConfig()),
    "colocated-preempting": (Layout("colocated", colocated=Parallel(1)), 10, SchedulerConfig()),
    "chunked": (Layout("colocated", colocated=Parallel(1), chunked=True), 64, SchedulerConfig(chunk_budget=32)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_and_simulator_give_the_same_events_at_the_same_times(case):
    layout, blocks, sched = CASES[case]
    arrivals, lengths = workload()
    sim = run_sim(layout, blocks, sched, arrivals, lengths)
    real = run_engine(layout, blocks, sched, arrivals, lengths)
    assert len(sim) == sum(o for _, o in lengths) + len(lengths)  # every token, then every finish
    assert sorted(real) == sorted(sim)
