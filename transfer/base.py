"""The KV hand-off interface: pull blocks of one pool into blocks of another.

Pull-based as in DistServe: the decode side allocates its blocks, copies the prompt's blocks out of
the prefill pool, and only then does the prefill side free them. Both pools share the block layout
[blocks, layers, 2, block_size, kv_heads, head_dim] (they may differ in block count), so a block is
one contiguous slab and a run of consecutive block ids on both sides moves as one copy. Torch copies also
convert between dtypes (a bf16 prefill pool into a float32 decode pool, when the phases run different
precisions); CuPy's peer-to-peer copies move bytes and need one dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from engine.kv_cache import KVPool


@dataclass
class TransferStats:
    bytes: int
    seconds: float
    copies: int  # contiguous runs moved

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


class KVTransfer(Protocol):
    name: str

    def pull(self, src: KVPool, src_blocks: list[int], dst: KVPool, dst_blocks: list[int]) -> TransferStats:
        """Copy src_blocks of src into dst_blocks of dst; returns when the data is in place."""
        ...


def runs(src_blocks: list[int], dst_blocks: list[int]) -> list[tuple[int, int, int]]:
    """Group a block mapping into (src_start, dst_start, length) runs consecutive on both sides."""
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(f"block count mismatch: {len(src_blocks)} source, {len(dst_blocks)} destination")
    out: list[tuple[int, int, int]] = []
    for s, d in zip(src_blocks, dst_blocks):
        if out and out[-1][0] + out[-1][2] == s and out[-1][1] + out[-1][2] == d:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((s, d, 1))
    return out


def check_compatible(src: KVPool, dst: KVPool, converts: bool = False) -> None:
    """Pools a transfer can move blocks between: one block shape; one dtype unless the transfer converts."""
    if src.block_shape != dst.block_shape or (src.cache.dtype != dst.cache.dtype and not converts):
        raise ValueError(f"incompatible KV pools: {src.name} {src.block_shape}/{src.cache.dtype} vs "
                         f"{dst.name} {dst.block_shape}/{dst.cache.dtype}")


def make_transfer(name: str, src_device: str, dst_device: str) -> KVTransfer:
    """'auto': CuPy peer-to-peer between two CUDA devices when cupy imports, else torch copies."""
    both_cuda = src_device.startswith("cuda") and dst_device.startswith("cuda")
    if name == "cupy" or (name == "auto" and both_cuda and src_device != dst_device):
        try:
            from transfer.cupy_p2p import CupyTransfer
            return CupyTransfer()
        except ImportError:
            if name == "cupy":
                raise
    from transfer.torch_copy import TorchTransfer
    return TorchTransfer()
