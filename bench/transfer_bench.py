"""KV hand-off speed: the transfer backend against a plain copy of the same bytes, same run; and the
hand-off's share of request latency in a real disaggregated run.

    python -m bench.transfer_bench [--tokens 16,128,512,1024] [--requests 16] [--ray]

--ray adds the hand-off between Ray actors (--cluster ray) on a local cluster of two simulated nodes: a decode
actor on the prefill actor's node (the pool mapped in shared memory) and one on the other node (a Ray object),
each pull timed from this process as the engine waits for it (the Ray call included), against a plain copy of
the same bytes inside the receiving actor.
"""
from __future__ import annotations

import argparse
import os
import random

import torch

from bench.common import machine, median_time, today
from engine.config import CacheConfig, SamplingParams
from engine.kv_cache import KVPool
from engine.loader import load_checkpoint
from transfer.base import make_transfer


def copy_speed(cfg, tokens_list: list[int], dtype: torch.dtype) -> list[dict]:
    src = KVPool(cfg, CacheConfig(num_blocks=1024), dtype, name="prefill")
    dst = KVPool(cfg, CacheConfig(num_blocks=768), dtype, name="decode")  # pools may differ in size
    src.cache.normal_()
    xfer = make_transfer("auto", "cpu:0", "cpu:1")
    rows = []
    rng = random.Random(0)
    for tokens in tokens_list:
        n = -(-tokens // src.block_size)
        contiguous = (list(range(100, 100 + n)), list(range(10, 10 + n)))
        scattered = (rng.sample(range(1024), n), rng.sample(range(768), n))
        nbytes = n * src.block_bytes
        plain_src = torch.empty(nbytes // src.cache.element_size(), dtype=dtype).normal_()
        plain_dst = torch.empty_like(plain_src)
        t_plain = median_time(lambda a=plain_dst, b=plain_src: a.copy_(b), repeat=9)
        for layout, (sb, db) in (("contiguous", contiguous), ("scattered", scattered)):
            t = median_time(lambda sb=sb, db=db: xfer.pull(src, sb, dst, db), repeat=9)
            rows.append({"tokens": tokens, "blocks": n, "layout": layout, "bytes": nbytes,
                         "transfer_GBps": nbytes / t / 1e9, "plain_copy_GBps": nbytes / t_plain / 1e9,
                         "ratio": t_plain / t})
    return rows


def ray_speed(ckpt, tokens_list: list[int], dtype: str) -> list[dict]:
    import ray
    from ray.cluster_utils import Cluster

    from engine.args import EngineArgs
    from serving.ray_cluster import RayCluster

    cores = sorted(os.sched_getaffinity(0))
    store = {"object_store_memory": 512 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False, **store})
    cluster.add_node(num_cpus=1, **store)
    blocks = 2 * -(-max(tokens_list) // 16)
    config = EngineArgs(mode="disagg", prefill_devices=[f"node0/cpu:{cores[0]}"], dtype=dtype, num_kv_blocks=blocks,
                        decode_devices=[f"node0/cpu:{cores[-1]}", f"node1/cpu:{cores[-1]}"], cluster="ray",
                        ray_address=cluster.address).engine_config()
    workers = RayCluster(config, ckpt)
    try:
        pre, near, far = workers.instances
        assert near.node_id == pre.node_id != far.node_id, "the simulated nodes did not get one group each"
        ray.get(pre.actor.call.remote(_fill, pre.handle))
        rows = []
        for tokens in tokens_list:
            n = -(-tokens // 16)
            nbytes = n * pre.pool.block_bytes
            plain = ray.get(near.actor.call.remote(_plain_copy_seconds, nbytes, getattr(torch, dtype)))
            src_blocks, dst_blocks = list(range(n)), list(range(n, 2 * n))
            for label, dst in (("same node, shared memory", near), ("across nodes, Ray object", far)):
                t = median_time(lambda d=dst, s=src_blocks, b=dst_blocks: ray.get(d.actor.pull.remote(pre.name, s, b)),
                                repeat=7)
                rows.append({"tokens": tokens, "path": label, "bytes": nbytes, "GBps": nbytes / t / 1e9,
                             "plain_copy_GBps": nbytes / plain / 1e9, "ratio": plain / t, "ms": 1e3 * t})
        return rows
    finally:
        workers.close()
        cluster.shutdown()


def _fill(handle) -> None:
    """In the prefill actor: random KV (untouched shared pages would read as the zero page)."""
    from transfer.shared import open_pool

    open_pool(handle, 16, "fill").cache.normal_()


def _plain_copy_seconds(nbytes: int, dtype: torch.dtype) -> float:
    """In an actor: a plain tensor copy of nbytes, median of 9."""
    src = torch.empty(nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype).normal_()
    dst = torch.empty_like(src)
    return median_time(lambda: dst.copy_(src), repeat=9)


def handoff_share(ckpt, num: int, dtype: str) -> dict:
    from serving.llm import LLM

    ids = ckpt.tokenizer.encode("The history of computing is long and varied. " * 200)
    rng = random.Random(1)
    prompts = [ids[: rng.randrange(64, 1024)] for _ in range(num)]
    with LLM(mode="disagg", dtype=dtype, checkpoint=ckpt) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    shares = [o.metrics.transfer_time / (o.metrics.finish - o.metrics.arrival) for o in outs]
    xfer = [o.metrics.transfer_time for o in outs]
    return {"requests": num, "mean_transfer_ms": 1e3 * sum(xfer) / num, "max_transfer_ms": 1e3 * max(xfer),
            "mean_share_of_latency": sum(shares) / num, "max_share_of_latency": max(shares),
            "mean_bytes": sum(o.metrics.transfer_bytes for o in outs) / num}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="16,128,512,1024")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--ray", action="store_true", help="also between Ray actors on two simulated nodes")
    args = ap.parse_args(argv)
    ckpt = load_checkpoint()
    dtype = getattr(torch, args.dtype)
    rows = copy_speed(ckpt.config, [int(t) for t in args.tokens.split(",")], dtype)
    block_kb = rows[0]["bytes"] / rows[0]["blocks"] / 1024
    print(f"# KV transfer, {today()}, {machine()}, {args.dtype}, one block = {block_kb:.0f} KiB (16 tokens)")
    print("| tokens | blocks | layout | MB | transfer GB/s | plain copy GB/s | transfer / plain |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['blocks']} | {r['layout']} | {r['bytes'] / 1e6:.1f} | {r['transfer_GBps']:.2f} "
              f"| {r['plain_copy_GBps']:.2f} | {r['ratio']:.2f} |")
    if args.ray:
        print(f"\n# KV hand-off between Ray actors (--cluster ray), two simulated nodes, {args.dtype}; round trip of "
              "the pull call from the engine's process, vs a plain copy of the same bytes in the receiving actor")
        print("| tokens | path | MB | ms | hand-off GB/s | plain copy GB/s | hand-off / plain |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for r in ray_speed(ckpt, [int(t) for t in args.tokens.split(",")], args.dtype):
            print(f"| {r['tokens']} | {r['path']} | {r['bytes'] / 1e6:.1f} | {r['ms']:.2f} | {r['GBps']:.2f} "
                  f"| {r['plain_copy_GBps']:.2f} | {r['ratio']:.2f} |")
    share = handoff_share(ckpt, args.requests, args.dtype)
    print(f"\nHand-off in a disaggregated run ({share['requests']} requests, prompts 64-1024 tokens, 32 output tokens):"
          f" mean {share['mean_transfer_ms']:.2f} ms (max {share['max_transfer_ms']:.2f} ms), "
          f"{100 * share['mean_share_of_latency']:.2f}% of request latency on average "
          f"(max {100 * share['max_share_of_latency']:.2f}%), mean {share['mean_bytes'] / 1e6:.1f} MB moved")


if __name__ == "__main__":
    main()
