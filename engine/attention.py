"""Attention over a paged KV cache, behind one small interface.

A batch is packed: the new tokens of every sequence back to back, no padding. Each sequence i has
q_len[i] new tokens whose K/V go to the cache first, and ctx_len[i] tokens of context in total
(cached + new). Prefill is q_len == ctx_len; decode is q_len == 1.

Backends: TorchAttention (any device; the CPU path and the reference) and, on CUDA, XFormersAttention
(engine/attention_xformers.py, imported lazily).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where each sequence's tokens and blocks are. Built once per step, shared by every layer."""

    q_lens: list[int]
    ctx_lens: list[int]
    block_tables: list[list[int]]
    block_size: int
    # [T] block id and offset of each new token's slot in the cache
    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor
    # decode-only batches: [B, max_blocks] padded tables and [B, 1, 1, S] mask of valid positions
    dense_tables: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None

    @property
    def is_decode(self) -> bool:
        return self.dense_tables is not None

    @classmethod
    def build(cls, q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device, dtype: torch.dtype = torch.float32) -> AttentionMetadata:
        blocks: list[int] = []
        offsets: list[int] = []
        for q, c, table in zip(q_lens, ctx_lens, block_tables):
            for pos in range(c - q, c):
                blocks.append(table[pos // block_size])
                offsets.append(pos % block_size)
        meta = cls(q_lens, ctx_lens, block_tables, block_size,
                   torch.tensor(blocks, dtype=torch.long, device=device),
                   torch.tensor(offsets, dtype=torch.long, device=device))
        if all(q == 1 for q in q_lens):
            used = [-(-c // block_size) for c in ctx_lens]  # blocks holding each context
            width = max(used)
            dense = [t[:u] + [0] * (width - u) for t, u in zip(block_tables, used)]
            meta.dense_tables = torch.tensor(dense, dtype=torch.long, device=device)
            pos = torch.arange(width * block_size, device=device)
            valid = pos[None, :] < torch.tensor(ctx_lens, device=device)[:, None]
            # additive float mask, built once per step instead of converted from bool in every layer
            meta.decode_mask = torch.zeros(valid.shape, dtype=dtype, device=device).masked_fill_(
                ~valid, float("-inf"))[:, None, None, :]
        return meta


class TorchAttention:
    """Plain torch: SDPA per prefill sequence, one padded batched SDPA for decode."""

    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D] new tokens; k_cache, v_cache: [blocks, block_size, KVH, D].

        Writes the new K/V into the cache, returns attention output [T, H, D].
        """
        k_cache[meta.slot_blocks, meta.slot_offsets] = k
        v_cache[meta.slot_blocks, meta.slot_offsets] = v
        if meta.is_decode:
            return self._decode(q, k_cache, v_cache, meta, scale)
        out = torch.empty_like(q)
        start = 0
        # 4-D inputs ([1, heads, len, D]): with 3-D ones torch's CPU SDPA falls back to its unfused math path
        # (7x slower at 512 bf16 tokens, 25x at 2048; bench/RESULTS.md, engine section)
        for q_len, ctx, table in zip(meta.q_lens, meta.ctx_lens, meta.block_tables):
            qi = q[start:start + q_len].transpose(0, 1)[None]  # [1, H, q_len, D]
            if q_len == ctx:  # nothing cached before: attend to the fresh K/V, causal
                ki = k[start:start + q_len].transpose(0, 1)[None]  # [1, KVH, q_len, D]
                vi = v[start:start + q_len].transpose(0, 1)[None]
                oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
            else:  # a chunk after cached context: gather it, causal with an offset
                ki, vi = (gather(c, table, ctx).transpose(0, 1)[None] for c in (k_cache, v_cache))  # [1, KVH, ctx, D]
                rows = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
                mask = torch.arange(ctx, device=q.device)[None, :] <= rows  # [q_len, ctx]
                oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True)
            out[start:start + q_len] = oi[0].transpose(0, 1)
            start += q_len
        return out

    @staticmethod
    def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        B, nb = meta.dense_tables.shape
        bs, kvh, d = k_cache.shape[1:]
        flat = meta.dense_tables.view(-1)  # index_select is ~4x faster than advanced indexing on CPU
        # [B * nb, bs, KVH, D] -> [B, KVH, nb*bs, D]
        kb = k_cache.index_select(0, flat).view(B, nb * bs, kvh, d).transpose(1, 2)
        vb = v_cache.index_select(0, flat).view(B, nb * bs, kvh, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), kb, vb, attn_mask=meta.decode_mask, scale=scale,
                                             enable_gqa=True)  # [B, H, 1, D]
        return out.squeeze(2)


def paged_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, tables: torch.Tensor, ctx_lens: torch.Tensor,
                           scale: float, kernel: bool = False) -> torch.Tensor:
    """Decode attention (one new token per sequence) that reads the cached context from its blocks in
    place and leaves the cache untouched: the new token's own k, v enter the softmax directly, and the
    caller writes every layer's new K/V in one indexed copy after the step. Written as plain indexing,
    products and sums, so that torch.compile fuses the block lookup into the score and value loops (no
    gathered copy of the context per layer); eager, it runs too (tests compare it with SDPA).

    q: [B, H, D]; k, v: [B, KVH, D]; k_cache, v_cache: [blocks, block_size, KVH, D]; tables: [B, nb] block
    ids (padding past a sequence's blocks: any valid id); ctx_lens: [B] tokens including the new one.
    Returns [B, H, D] in q's dtype; scores and softmax in float32.

    kernel: run the same as one native op instead (engine/cpu_kernels.cpp decode_attention: each sequence's
    rows read once, in place; kernels.decode_attention(dtype, D) says where it exists).
    """
    if kernel:
        return torch.ops.distserve.decode_attention(q, k, v, k_cache, v_cache, tables, ctx_lens, scale)
    B, H, D = q.shape
    kvh = k.shape[1]
    S = tables.shape[1] * k_cache.shape[1]
    kb = k_cache[tables].view(B, S, kvh, D)  # [B, S, KVH, D] cached positions 0..S-1
    vb = v_cache[tables].view(B, S, kvh, D)
    qg = q.reshape(B, kvh, H // kvh, D).float()  # query heads grouped by their KV head (GQA)
    cached = (qg[:, None] * kb[:, :, :, None, :].float()).sum(-1) * scale  # [B, S, KVH, G]
    past = torch.arange(S, device=q.device)[None, :] < (ctx_lens - 1)[:, None]  # [B, S]
    cached = cached.masked_fill(~past[:, :, None, None], float("-inf"))
    own = (qg * k[:, :, None, :].float()).sum(-1)[:, None] * scale  # [B, 1, KVH, G]
    p = torch.softmax(torch.cat([cached, own], dim=1), dim=1)  # [B, S + 1, KVH, G]
    out = (p[:, :-1, :, :, None] * vb[:, :, :, None, :].float()).sum(1)  # [B, KVH, G, D]
    out = out + p[:, -1, :, :, None] * v[:, :, None, :].float()  # (index -1, not S: S stays symbolic)
    return out.reshape(B, H, D).to(q.dtype)


def gather(cache: torch.Tensor, table: list[int], n: int) -> torch.Tensor:
    """The first n tokens of a sequence from its blocks: [n, KVH, D]."""
    idx = torch.tensor(table[: -(-n // cache.shape[1])], dtype=torch.long, device=cache.device)
    return cache.index_select(0, idx).flatten(0, 1)[:n]


def make_backend(name: str, device: torch.device):
    """'auto' picks xformers on CUDA when it imports, else torch."""
    if name in ("auto", "xformers") and device.type == "cuda":
        try:
            from engine.attention_xformers import XFormersAttention
            return XFormersAttention()
        except ImportError:
            if name == "xformers":
                raise
    return TorchAttention()
