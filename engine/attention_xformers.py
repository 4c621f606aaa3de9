"""Attention on CUDA through xformers' memory-efficient kernels (imported lazily, CUDA only).

Same interface as TorchAttention. The batch's context K/V are gathered from the paged cache into
one packed sequence, and a block-diagonal causal bias aligned at the bottom right handles every mix
of prefill, chunk and decode in one kernel call: sequence i's q_len queries see the last of its
ctx_len keys causally. Grouped-query attention uses xformers' 5-D form [B, M, G, H/G, D], with the
K/V heads expanded (a view, no copy) across each group.
"""
from __future__ import annotations

import torch
from xformers.ops import fmha  # ImportError here: make_backend falls back to torch

from engine.attention import AttentionMetadata


class XFormersAttention:
    name = "xformers"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D]; caches [blocks, block_size, KVH, D]. Returns [T, H, D]."""
        k_cache[meta.slot_blocks, meta.slot_offsets] = k
        v_cache[meta.slot_blocks, meta.slot_offsets] = v
        idx = _context_blocks(meta, k_cache.device)
        kv_len = sum(meta.ctx_lens)
        keep = _context_positions(meta, k_cache.device)
        ks = k_cache.index_select(0, idx).flatten(0, 1).index_select(0, keep)  # [sum ctx, KVH, D]
        vs = v_cache.index_select(0, idx).flatten(0, 1).index_select(0, keep)
        T, H, D = q.shape
        G = ks.shape[1]
        bias = fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask.from_seqlens(
            q_seqlen=meta.q_lens, kv_seqlen=meta.ctx_lens)
        out = fmha.memory_efficient_attention_forward(
            q.view(1, T, G, H // G, D),
            ks.view(1, kv_len, G, 1, D).expand(1, kv_len, G, H // G, D),
            vs.view(1, kv_len, G, 1, D).expand(1, kv_len, G, H // G, D),
            attn_bias=bias, scale=scale)
        return out.reshape(T, H, D)


def _context_blocks(meta: AttentionMetadata, device: torch.device) -> torch.Tensor:
    ids = [b for table, c in zip(meta.block_tables, meta.ctx_lens) for b in table[: -(-c // meta.block_size)]]
    return torch.tensor(ids, dtype=torch.long, device=device)


def _context_positions(meta: AttentionMetadata, device: torch.device) -> torch.Tensor:
    """Rows of the gathered blocks that hold real tokens (each sequence's last block may be partial)."""
    rows: list[int] = []
    base = 0
    for c in meta.ctx_lens:
        rows.extend(range(base, base + c))
        base += -(-c // meta.block_size) * meta.block_size
    return torch.tensor(rows, dtype=torch.long, device=device)
