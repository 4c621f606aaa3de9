"""Device-agnostic hand-off with torch tensor copies (CPU pools, or any two torch devices)."""
from __future__ import annotations

import time

import torch

from engine.kv_cache import KVPool
from transfer.base import TransferStats, check_compatible, runs

MAX_RUNS = 4  # beyond this many runs, copy by index instead of slab by slab


class TorchTransfer:
    name = "torch"

    def pull(self, src: KVPool, src_blocks: list[int], dst: KVPool, dst_blocks: list[int]) -> TransferStats:
        check_compatible(src, dst, converts=True)  # copy_ converts; the gather below is cast
        t0 = time.perf_counter()
        moves = runs(src_blocks, dst_blocks)
        cross = src.cache.device != dst.cache.device
        if len(moves) <= MAX_RUNS:
            for s, d, n in moves:  # one slab copy per run: [n, layers, 2, block_size, kvh, hd]
                dst.cache[d:d + n].copy_(src.cache[s:s + n], non_blocking=cross)
        else:  # fragmented: one gather and one scatter beat many small copies
            idx = torch.tensor(src_blocks, device=src.cache.device)
            dst.cache[torch.tensor(dst_blocks, device=dst.cache.device)] = src.cache[idx].to(dst.cache.device,
                                                                                             dst.cache.dtype)
        if dst.cache.device.type == "cuda":
            torch.cuda.synchronize(dst.cache.device)
        return TransferStats(len(src_blocks) * src.block_bytes, time.perf_counter() - t0, len(moves))
