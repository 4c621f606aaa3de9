"""CuPy peer-to-peer hand-off between two CUDA devices (imported lazily, only on CUDA).

Per CuPy's documentation: enable peer access once per device pair (cupy.cuda.runtime.
deviceEnablePeerAccess from the destination device), then cudaMemcpyPeerAsync each contiguous run
on a dedicated stream of the destination device, ordered after the producer by a CUDA event.
"""
from __future__ import annotations

import time

import cupy  # noqa: F401  (ImportError here makes make_transfer fall back to torch)
import torch

from engine.kv_cache import KVPool
from transfer.base import TransferStats, check_compatible, runs
from transfer.torch_copy import TorchTransfer


class CupyTransfer:
    name = "cupy"

    def __init__(self) -> None:
        self._peers: set[tuple[int, int]] = set()
        self._streams: dict[int, torch.cuda.Stream] = {}

    def _enable_peer(self, src_dev: int, dst_dev: int) -> None:
        if src_dev == dst_dev or (src_dev, dst_dev) in self._peers:
            return
        rt = cupy.cuda.runtime
        if not rt.deviceCanAccessPeer(dst_dev, src_dev):
            raise RuntimeError(f"cuda:{dst_dev} cannot access cuda:{src_dev} peer-to-peer")
        with cupy.cuda.Device(dst_dev):
            try:
                rt.deviceEnablePeerAccess(src_dev)
            except rt.CUDARuntimeError as e:  # already enabled by someone else is fine
                if "PeerAccessAlreadyEnabled" not in str(e):
                    raise
        self._peers.add((src_dev, dst_dev))

    def pull(self, src: KVPool, src_blocks: list[int], dst: KVPool, dst_blocks: list[int]) -> TransferStats:
        if src.cache.dtype != dst.cache.dtype:  # phases in two precisions: bytes alone cannot convert
            return TorchTransfer().pull(src, src_blocks, dst, dst_blocks)
        check_compatible(src, dst)
        s_dev, d_dev = src.cache.device.index, dst.cache.device.index
        self._enable_peer(s_dev, d_dev)
        t0 = time.perf_counter()
        # the producer's writes (on the prefill device's current stream) must land first: order the
        # dedicated copy stream after them with an event, no host round-trip
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(src.cache.device))
        stream = self._streams.get(d_dev)
        if stream is None:
            stream = self._streams[d_dev] = torch.cuda.Stream(device=dst.cache.device)
        stream.wait_event(ready)
        moves = runs(src_blocks, dst_blocks)
        with cupy.cuda.Device(d_dev):
            for s, d, n in moves:  # one cudaMemcpyPeerAsync per contiguous run of blocks
                cupy.cuda.runtime.memcpyPeerAsync(dst.cache[d].data_ptr(), d_dev, src.cache[s].data_ptr(), s_dev,
                                                  n * src.block_bytes, stream.cuda_stream)
        stream.synchronize()  # the decode step that follows reads these blocks
        return TransferStats(len(src_blocks) * src.block_bytes, time.perf_counter() - t0, len(moves))
