"""KV hand-off between processes of one node: the prefill pool's memory is shared, so a pull is the one copy
a hand-off needs, the same copy TorchTransfer makes between two pools of one process.

CPU: the pool is a file in /dev/shm mapped with `torch.from_file(path, shared=True)`. Its name is removed as
soon as it exists, the owner keeping a descriptor open; a peer maps it through /proc/OWNER_PID/fd/N and copies
blocks out of it. The memory lives while some process maps it, so a killed process leaves nothing behind in
/dev/shm, and a peer that is restarted maps the pool again the same way.
CUDA: the pool's CUDA IPC handle, made by `torch.multiprocessing.reductions.reduce_tensor` (how torch shares
CUDA tensors between processes); the peer opens it with the rebuild function that came with it, and the
pull is a device-to-device copy (peer-to-peer between two GPUs). Both processes must number the GPUs alike
(serving/ray_cluster.py keeps every GPU visible to every actor).
"""
from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass

import torch

from engine.kv_cache import KVPool

SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class PoolHandle:
    """How another process of the node maps a pool: a /dev/shm file (CPU) or a CUDA IPC handle."""

    shape: tuple[int, ...]  # [blocks, layers, 2, block_size, kv_heads, head_dim]
    dtype: str  # "bfloat16", ...
    path: str | None = None  # CPU
    ipc: tuple | None = None  # CUDA: (rebuild function, its arguments)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


class SharedPool:
    """Allocates one pool where the node's other processes can map it (KVPool(allocate=shared.allocate))."""

    def __init__(self, name: str, device: torch.device, directory: str = SHM_DIR) -> None:
        self.device = device
        self.name = os.path.join(directory, f"distserve-kv-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.tensor: torch.Tensor | None = None
        self.fd: int | None = None  # keeps the unnamed file reachable for peers

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.device.type == "cuda":
            self.tensor = torch.zeros(shape, dtype=dtype, device=self.device)
            return self.tensor
        # a new file reads as zeros; pages are taken as they are first written
        self.tensor = torch.from_file(self.name, shared=True, size=math.prod(shape), dtype=dtype).view(shape)
        self.fd = os.open(self.name, os.O_RDWR)
        os.unlink(self.name)
        return self.tensor

    def handle(self) -> PoolHandle:
        t = self.tensor
        dtype = str(t.dtype).removeprefix("torch.")
        if t.device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor  # lazy: CUDA only

            return PoolHandle(tuple(t.shape), dtype, ipc=reduce_tensor(t))
        return PoolHandle(tuple(t.shape), dtype, path=f"/proc/{os.getpid()}/fd/{self.fd}")


def open_pool(handle: PoolHandle, block_size: int, name: str) -> KVPool:
    """Map another process's pool (same node) here, without copying it."""
    if handle.ipc is not None:
        rebuild, args = handle.ipc
        cache = rebuild(*args)
    else:
        cache = torch.from_file(handle.path, shared=True, size=math.prod(handle.shape),
                                dtype=handle.torch_dtype).view(handle.shape)
    return KVPool.over(cache, block_size, name)
