"""KV hand-off speed: the transfer backend against a plain copy of the same bytes, same run; and the
hand-off's share of request latency in a real disaggregated run.

    python -m bench.transfer_bench [--tokens 16,128,512,1024] [--requests 16]
"""
from __future__ import annotations

import argparse
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
    share = handoff_share(ckpt, args.requests, args.dtype)
    print(f"\nHand-off in a disaggregated run ({share['requests']} requests, prompts 64-1024 tokens, 32 output tokens):"
          f" mean {share['mean_transfer_ms']:.2f} ms (max {share['max_transfer_ms']:.2f} ms), "
          f"{100 * share['mean_share_of_latency']:.2f}% of request latency on average "
          f"(max {100 * share['max_share_of_latency']:.2f}%), mean {share['mean_bytes'] / 1e6:.1f} MB moved")


if __name__ == "__main__":
    main()
