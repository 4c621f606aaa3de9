"""GGUF-quantized matrices kept in their blocks (Q4_0, Q4_1, Q8_0), for the native-weights path.

A QuantTensor is the checkpoint's own blocks split into arrays the kernels read with aligned loads;
nothing is rounded or re-quantized, so `dequantize()` returns exactly what gguf-py's dequantization
returns (tests/test_quant.py checks it bit for bit). Per row n of the [N, K] matrix and block g of
32 values (nb = K / 32 blocks, padded to an even count with zero blocks):
    qs [N, nb, 16] nibbles (Q4_x) or [N, nb, 32] int8 (Q8_0); d [N, nb] float16; m [N, nb] float16 (Q4_1)
    Q4_0: w = d * (q - 8)      Q4_1: w = d * q + m      Q8_0: w = d * q
On the vector builds the kernels read the blocks interleaved by rows (`interleave()`, once at load: 16 rows'
bytes side by side, so a vector's lanes are output rows; engine/cpu_kernels.cpp quant_pack_rows gives the
layout), which `deinterleave()` undoes exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine import kernels

KINDS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}
# bytes of one 32-value GGUF block: (scale bytes, payload bytes)
_LAYOUT = {"Q4_0": (2, 16), "Q4_1": (4, 16), "Q8_0": (2, 32)}


@dataclass
class QuantTensor:
    kind: str
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    k: int  # columns: the matrix is [N, k]
    # interleaved by rows: N (then qs [ceil(N / 16), nb, chunks, 32], d / m [ceil(N / 16), nb, 16]); None: GGUF order
    n_rows: int | None = None

    @property
    def interleaved(self) -> bool:
        return self.n_rows is not None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows if self.interleaved else self.qs.shape[0], self.k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    @classmethod
    def from_blocks(cls, raw: np.ndarray, kind: str, k: int) -> QuantTensor:
        """raw: the GGUF tensor's bytes, [N, K / 32 * block bytes] (one row of blocks per output)."""
        if kind not in KINDS:
            raise ValueError(f"no native kernel for {kind}; native kinds: {sorted(KINDS)}")
        head, body = _LAYOUT[kind]
        n, nb = raw.shape[0], k // 32
        if k % 32 or raw.shape[1] != nb * (head + body):
            raise ValueError(f"{kind} tensor of {raw.shape[1]} bytes per row does not hold {k} values")
        # a copy: raw may be a read-only map of the file
        blocks = torch.from_numpy(np.array(raw, dtype=np.uint8)).view(n, nb, head + body)
        d = blocks[:, :, 0:2].contiguous().view(torch.float16).view(n, nb)
        m = blocks[:, :, 2:4].contiguous().view(torch.float16).view(n, nb) if kind == "Q4_1" else None
        qs = blocks[:, :, head:]
        if nb % 2:  # the kernels read blocks in pairs: one zero block (d = 0) ends an odd row
            qs = torch.cat([qs, qs.new_zeros(n, 1, body)], 1)
            d = torch.cat([d, d.new_zeros(n, 1)], 1)
            m = torch.cat([m, m.new_zeros(n, 1)], 1) if m is not None else None
        return cls(kind, qs.contiguous(), d.contiguous(), m.contiguous() if m is not None else None, k)

    def interleave(self) -> QuantTensor:
        """The same blocks interleaved by rows, as the vector kernels read them (lossless: `deinterleave()`)."""
        if self.interleaved:
            return self
        qs, d, m = torch.ops.distserve.quant_pack_rows(self.qs, self.d, self.m, KINDS[self.kind], self.k)
        return QuantTensor(self.kind, qs, d, m, self.k, n_rows=self.qs.shape[0])

    def deinterleave(self) -> QuantTensor:
        """The blocks in GGUF's order, one row of blocks per output row."""
        if not self.interleaved:
            return self
        qs, d, m = torch.ops.distserve.quant_unpack_rows(self.qs, self.d, self.m, KINDS[self.kind], self.k,
                                                         self.n_rows)
        return QuantTensor(self.kind, qs, d, m, self.k)

    def _gguf_order(self, what: str) -> None:
        if self.interleaved:
            raise ValueError(f"{what} needs the blocks in GGUF's order (deinterleave() first)")

    def rows(self, index: torch.Tensor | np.ndarray) -> QuantTensor:
        """The matrix with its rows reordered (rows are independent blocks: lossless)."""
        self._gguf_order("reordering rows")
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = lambda t: t[idx].contiguous() if t is not None else None  # noqa: E731
        return QuantTensor(self.kind, pick(self.qs), pick(self.d), pick(self.m), self.k)

    @staticmethod
    def cat(parts: list[QuantTensor]) -> QuantTensor:
        """Rows of several matrices of one kind and width stacked (fused qkv, gate/up)."""
        for p in parts:
            p._gguf_order("fusing matrices")
        kinds, ks = {p.kind for p in parts}, {p.k for p in parts}
        if len(kinds) != 1 or len(ks) != 1:
            raise ValueError(f"cannot fuse {sorted(kinds)} matrices of widths {sorted(ks)}")
        m = torch.cat([p.m for p in parts]) if parts[0].m is not None else None
        return QuantTensor(parts[0].kind, torch.cat([p.qs for p in parts]), torch.cat([p.d for p in parts]), m,
                           parts[0].k)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K], bit for bit gguf-py's dequantization of the original blocks."""
        if self.interleaved:  # (interleaved only where the kernels are loaded)
            return torch.ops.distserve.quant_dequant_rows(self.qs, self.d, self.m, KINDS[self.kind], self.k,
                                                          self.n_rows)
        if kernels.load():
            return torch.ops.distserve.quant_dequant(self.qs, self.d, self.m, KINDS[self.kind], self.k)
        d = self.d.float()[:, :, None]
        if self.kind == "Q8_0":
            w = d * self.qs.view(torch.int8).float()
        else:
            q = torch.cat([self.qs & 15, self.qs >> 4], dim=-1).float()  # values 0-15, then 16-31
            w = d * q + self.m.float()[:, :, None] if self.kind == "Q4_1" else d * (q - 8)
        return w.reshape(w.shape[0], -1)[:, : self.k].contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] @ W^T -> float32 [M, N] with the kernels (the exact weight values; x rounded to int16 per
        block of 32 on the vector builds, engine/cpu_kernels.cpp)."""
        if self.interleaved:
            return torch.ops.distserve.quant_linear_rows(x, self.qs, self.d, self.m, KINDS[self.kind], self.k,
                                                         self.n_rows)
        return torch.ops.distserve.quant_linear(x, self.qs, self.d, self.m, KINDS[self.kind], self.k)


def round_like_kernels(x: torch.Tensor) -> torch.Tensor:
    """float32 x [M, K] as QuantTensor.matmul's kernels round it (int16 per block of 32 on the vector builds):
    the dense product of many rows on it matches the kernels' up to float32 summation order, so a prompt's
    logits barely depend on whether its chunk went through the kernels or the dense product. (bf16 x is
    returned as is: bf16 products part from the kernels' far more than the rounding.)"""
    return torch.ops.distserve.round_int16(x) if x.dtype == torch.float32 and kernels.int16_products() else x


@dataclass
class QuantStack:
    """Matrices of one kind, shape and layout, one per layer, stacked: qs [L, *qs.shape], d / m [L, *d.shape].
    Read through it, a compiled step has two or three inputs per fused matrix, not that many per layer
    (engine/linear.py stack_layers says why)."""
    kind: str
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    k: int
    n_rows: int | None = None  # as QuantTensor's

    @classmethod
    def of(cls, parts: list[QuantTensor]) -> QuantStack | None:
        """The stack of parts, or None where they differ in kind, shape or layout (then each stays on its own)."""
        if not parts or len({(p.kind, p.qs.shape, p.k, p.m is None, p.n_rows) for p in parts}) != 1:
            return None
        m = torch.stack([p.m for p in parts]) if parts[0].m is not None else None
        return cls(parts[0].kind, torch.stack([p.qs for p in parts]), torch.stack([p.d for p in parts]), m,
                   parts[0].k, parts[0].n_rows)

    def __len__(self) -> int:
        return self.qs.shape[0]

    def layer(self, i: int) -> QuantTensor:
        """Layer i's matrix, as views of the stack."""
        return QuantTensor(self.kind, self.qs[i], self.d[i], self.m[i] if self.m is not None else None, self.k,
                           self.n_rows)
