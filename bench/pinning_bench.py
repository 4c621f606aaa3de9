"""Do per-instance core pinning and thread counts take effect? Two instances each run the same
fixed matmul workload on their own threads, alone and at the same time, pinned to one core each
(cpu:0 / cpu:1, 1 torch thread each) and unpinned (both on all cores, all threads each).

If pinning works, two pinned instances together finish about twice the work of one in the same
time, and their per-instance speed barely drops; unpinned, the two thread teams fight for the
same cores. Run: python -m bench.pinning_bench
"""
from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import wait

import torch

from bench.common import machine, today
from engine.config import CacheConfig
from engine.instance import Instance
from engine.model import LlamaModel
from tests.helpers import hf_model, tiny_config


def work(n: int, size: int) -> float:
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    t = time.perf_counter()
    for _ in range(n):
        a @ b
    return time.perf_counter() - t


def run(instances: list[Instance], n: int, size: int) -> tuple[float, list[float]]:
    t = time.perf_counter()
    futures = [i.executor.submit(work, n, size) for i in instances]
    wait(futures)
    return time.perf_counter() - t, [f.result() for f in futures]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("needs at least 2 cores")
    cfg = tiny_config()
    model = LlamaModel(cfg, hf_model(cfg).state_dict())
    mk = lambda name, dev: Instance(name, "colocated", dev, model, CacheConfig(num_blocks=4))  # noqa: E731
    flops = 2 * args.size ** 3 * args.iters
    print(f"# Pinning, {today()}, {machine()}; each instance: {args.iters} fp32 matmuls of {args.size}^2")
    print("| layout | instances | wall (s) | GFLOP/s total | per-instance GFLOP/s |")
    print("|---|---:|---:|---:|---:|")
    for label, devs in (("pinned: cpu:0 / cpu:1, 1 thread each", [f"cpu:{cores[0]}", f"cpu:{cores[1]}"]),
                        ("unpinned: cpu / cpu, all threads each", ["cpu", "cpu"])):
        insts = [mk(f"i{k}", d) for k, d in enumerate(devs)]
        try:
            run(insts[:1], 3, args.size)  # warm up both thread teams
            run(insts[1:], 3, args.size)
            for k in (1, 2):
                wall, each = run(insts[:k], args.iters, args.size)
                per = " / ".join(f"{flops / t / 1e9:.1f}" for t in each)
                print(f"| {label} | {k} | {wall:.2f} | {k * flops / wall / 1e9:.1f} | {per} |")
        finally:
            for i in insts:
                i.close()


if __name__ == "__main__":
    main()
