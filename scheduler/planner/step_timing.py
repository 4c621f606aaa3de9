"""Timing the real engine's steps, as the profiler (profile.py) needs them: a prefill or decode step of
given shape run by Instance.run on the instance's own (pinned) thread, warm-up first, then the median of
repeats; how much a step slows while another instance of the process is busy; and the KV hand-off and
swap bandwidths."""
from __future__ import annotations

import random
import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch

from engine.config import CacheConfig, SamplingParams
from engine.instance import GIL_SWITCH_INTERVAL_S, Instance
from engine.kv_cache import KVPool
from engine.model import LlamaModel
from engine.request import Request
from engine.step import Step
from transfer.torch_copy import TorchTransfer

# ---- steps on the instance's thread ---------------------------------------------------------------

def _timed(inst: Instance, step: Step) -> float:
    """Milliseconds of one Instance.run, timed on the instance's (pinned) thread."""
    def work() -> float:
        t0 = time.perf_counter()
        inst.run(step)
        return (time.perf_counter() - t0) * 1e3
    return inst.executor.submit(work).result()


def _median_ms(inst: Instance, make: Callable[[], tuple[Step, list[Request]]], warmup: int, repeats: int) -> float:
    """Build a fresh step (and its blocks) per run, so every run does exactly the same work."""
    times = []
    for i in range(warmup + repeats):
        step, reqs = make()
        try:
            t = _timed(inst, step)
        finally:
            for r in reqs:
                inst.pool.allocator.free(r.block_table)
        if i >= warmup:
            times.append(t)
    return statistics.median(times)


def _request(inst: Instance, rid: str, prompt_len: int, decoding: bool, rng: random.Random) -> Request:
    """A request with blocks from the instance's pool, as the engine's policies allocate them. Decoding:
    the prompt's KV counts as cached (its slots hold whatever the pool holds: timing does not depend on
    the values) and one sampled token waits to be computed."""
    vocab = inst.model.cfg.vocab_size
    req = Request(rid, [rng.randrange(vocab) for _ in range(prompt_len)],
                  SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    if decoding:
        req.output_ids.append(rng.randrange(vocab))
        req.num_computed = prompt_len
    alloc = inst.pool.allocator
    req.block_table = alloc.allocate(rid, alloc.blocks_for(req.num_tokens))
    return req


def time_prefill(inst: Instance, lengths: list[int], warmup: int, repeats: int, seed: int = 0) -> float:
    rng = random.Random(seed)

    def make() -> tuple[Step, list[Request]]:
        reqs = [_request(inst, f"p{i}", n, False, rng) for i, n in enumerate(lengths)]
        return Step(items=[(r, r.num_prompt) for r in reqs]), reqs
    return _median_ms(inst, make, warmup, repeats)


def time_decode(inst: Instance, batch: int, ctx: int, warmup: int, repeats: int, seed: int = 0) -> float:
    """One decode step of `batch` requests, each with ctx tokens of context after this step."""
    rng = random.Random(seed)

    def make() -> tuple[Step, list[Request]]:
        reqs = [_request(inst, f"d{i}", ctx - 1, True, rng) for i in range(batch)]
        return Step(items=[(r, 1) for r in reqs]), reqs
    return _median_ms(inst, make, warmup, repeats)


# ---- interference between instances of one process -------------------------------------------------

def _busy_loop(inst: Instance, step: Step, stop: threading.Event) -> None:
    while not stop.is_set():  # Instance.run leaves request state alone: the same step can rerun
        inst.run(step)


def _with_neighbor(neighbor: Instance, step: Step, measure: Callable[[], float]) -> float:
    stop = threading.Event()
    fut = neighbor.executor.submit(_busy_loop, neighbor, step, stop)
    try:
        time.sleep(0.2)  # the neighbor is mid-step when the measurement starts
        return measure()
    finally:
        stop.set()
        fut.result()


def interference(inst: Instance, neighbor: Instance, repeats: int = 5) -> dict[str, float]:
    """Step-time factors while another instance of this process (other cores) is busy: a decode step
    next to a running prefill, a prefill next to running decodes (the disaggregated layout's overlap).
    CPU instances are threads of one process; they share the GIL and the memory bus."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, GIL_SWITCH_INTERVAL_S))
    rng = random.Random(0)
    pre_reqs = [_request(neighbor, "np", 96, False, rng)]
    dec_reqs = [_request(neighbor, f"nd{i}", 127, True, rng) for i in range(4)]
    try:
        pre_step = Step(items=[(r, r.num_prompt) for r in pre_reqs])
        dec_step = Step(items=[(r, 1) for r in dec_reqs])
        dec = [time_decode(inst, 4, 128, 1, repeats),
               _with_neighbor(neighbor, pre_step, lambda: time_decode(inst, 4, 128, 1, repeats))]
        pre = [time_prefill(inst, [96], 1, repeats),
               _with_neighbor(neighbor, dec_step, lambda: time_prefill(inst, [96], 1, repeats))]
    finally:
        for r in pre_reqs + dec_reqs:
            neighbor.pool.allocator.free(r.block_table)
        sys.setswitchinterval(old)
    return {"prefill": pre[1] / pre[0], "decode": dec[1] / dec[0]}


# ---- bandwidths ------------------------------------------------------------------------------------

def transfer_bandwidth(model: LlamaModel, block_size: int = 16, mbytes: float = 8.0, repeats: int = 5) -> float:
    """Bytes/s of a KV hand-off between two CPU pools (TorchTransfer.pull over ~mbytes MB)."""
    probe = KVPool(model.cfg, CacheConfig(block_size=block_size, num_blocks=1), model.dtype)
    n = max(1, int(mbytes * 1e6 // probe.block_bytes))
    src = KVPool(model.cfg, CacheConfig(block_size=block_size, num_blocks=n), model.dtype, name="src")
    dst = KVPool(model.cfg, CacheConfig(block_size=block_size, num_blocks=n), model.dtype, name="dst")
    src.cache.normal_()
    xfer, blocks = TorchTransfer(), list(range(n))
    secs = [xfer.pull(src, blocks, dst, blocks).seconds for _ in range(repeats + 1)][1:]
    return n * src.block_bytes / statistics.median(secs)


def swap_bandwidth(pool: KVPool, mbytes: float = 8.0, repeats: int = 5) -> float:
    """Bytes/s of the swap copies Instance.run makes (indexed gather to host, indexed scatter back)."""
    n = max(1, min(pool.num_blocks, int(mbytes * 1e6 // pool.block_bytes)))
    idx = torch.arange(n, device=pool.cache.device)
    secs = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        host = pool.cache[idx].to("cpu")
        pool.cache[idx] = host.to(pool.cache.device)
        secs.append((time.perf_counter() - t0) / 2)  # two copies per round: out and back in
    return n * pool.block_bytes / statistics.median(secs[1:])
