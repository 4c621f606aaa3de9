"""A paged KV pool: one preallocated tensor, fixed-size blocks, and the block allocator over it."""
from __future__ import annotations

import heapq
from collections.abc import Callable

import torch

from engine.config import CacheConfig, ModelConfig


class BlockAllocator:
    """A free list of block ids with an owner per allocated block.

    Verbs: can_allocate / allocate / append / free. `check()` verifies the invariants tests rely on:
    no block owned twice, free + owned = total. The free list is a min-heap: handing out the lowest
    ids keeps a request's blocks mostly consecutive, so a hand-off moves few large slabs.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_ids: list[int] = list(range(num_blocks))  # a heap (sorted is a valid heap)
        self.owner: dict[int, str] = {}

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free_ids)

    def allocate(self, owner: str, num_blocks: int) -> list[int]:
        if num_blocks > len(self.free_ids):
            raise MemoryError(f"KV pool exhausted: need {num_blocks} blocks, {len(self.free_ids)} free")
        ids = [heapq.heappop(self.free_ids) for _ in range(num_blocks)]
        for b in ids:
            self.owner[b] = owner
        return ids

    def append(self, owner: str, table: list[int], num_tokens: int) -> bool:
        """Grow `table` in place to hold `num_tokens` tokens. False (and no change) if the pool is short."""
        need = self.blocks_for(num_tokens) - len(table)
        if need <= 0:
            return True
        if need > len(self.free_ids):
            return False
        table.extend(self.allocate(owner, need))
        return True

    def free(self, table: list[int]) -> None:
        for b in table:
            if self.owner.pop(b, None) is None:
                raise RuntimeError(f"double free of KV block {b}")
            heapq.heappush(self.free_ids, b)
        table.clear()

    def check(self) -> None:
        free = set(self.free_ids)
        if len(free) != len(self.free_ids):
            raise AssertionError("a KV block is on the free list twice")
        if free & self.owner.keys():
            raise AssertionError(f"KV blocks both free and owned: {sorted(free & self.owner.keys())[:8]}")
        if len(free) + len(self.owner) != self.num_blocks:
            raise AssertionError(f"free ({len(free)}) + owned ({len(self.owner)}) != total ({self.num_blocks})")


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype_bytes(dtype)
    for d in shape:
        n *= d
    return n


class KVPool:
    """One instance's KV cache.

    cache: [num_blocks, num_layers, 2, block_size, kv_heads, head_dim], block-major so that one
    request's blocks are whole contiguous slabs: a hand-off moves them with one indexed copy.
    """

    def __init__(self, model: ModelConfig, cache: CacheConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu", name: str = "pool",
                 allocate: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None) -> None:
        """allocate(shape, dtype) -> a zeroed tensor: where the pool's memory comes from (default: torch.zeros
        on `device`; transfer/shared.py puts it in shared memory so that other processes can read it)."""
        block_shape = (model.num_layers, 2, cache.block_size, model.num_kv_heads, model.head_dim)
        num_blocks = cache.num_blocks or max(1, cache.memory_bytes // _bytes(block_shape, dtype))
        shape = (num_blocks, *block_shape)
        self._init(allocate(shape, dtype) if allocate else torch.zeros(shape, dtype=dtype, device=device),
                   cache.block_size, name)

    @classmethod
    def over(cls, cache: torch.Tensor, block_size: int, name: str) -> KVPool:
        """A pool over an existing tensor [blocks, layers, 2, block_size, kv_heads, head_dim]: another process's
        pool mapped here, or blocks received from another node."""
        pool = cls.__new__(cls)
        pool._init(cache, block_size, name)
        return pool

    def _init(self, cache: torch.Tensor, block_size: int, name: str) -> None:
        self.name = name
        self.block_size = block_size
        self.block_shape = tuple(cache.shape[1:])
        self.block_bytes = _bytes(self.block_shape, cache.dtype)
        self.cache = cache
        self.allocator = BlockAllocator(cache.shape[0], block_size)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def dtype(self) -> torch.dtype:
        return self.cache.dtype

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of layer i: k, v each [num_blocks, block_size, kv_heads, head_dim] (strided)."""
        return self.cache[:, i, 0], self.cache[:, i, 1]

    def check(self) -> None:
        self.allocator.check()
