"""The model's matrix products, one object per weight, chosen once at load time.

    DenseLinear   the weight in the activation dtype; on CPU in bf16 it is prepacked once for oneDNN
                  (AMX / AVX-512 BF16 kernels, ~1.1-1.3x F.linear from batch 5 up), and where the engine's
                  streaming GEMV is built (AVX-512 BF16) the row-major weight stays too: batches of 1-4
                  rows run on it (~1.5x oneDNN at batch 1), at the price of a second copy in memory.
                  In float32 it is also packed once into panels of 16 rows (panels()), on which the engine's
                  register-tiled kernel runs decode batches of 1-64 rows (F.linear there is MKL's sgemm,
                  which repacks the weight on every call, or its sgemv); prefill chunks run F.linear on
                  the row-major copy kept beside the panels
    QuantLinear   a GGUF Q4_0 / Q4_1 / Q8_0 matrix in its own blocks (engine/quant.py; interleaved by rows on
                  the vector builds): small batches
                  run the block kernels of engine/cpu_kernels.cpp (x rounded to int16 per block); large
                  ones (prefill) dequantize the matrix into the activation dtype and run the dense GEMM,
                  which is compute-bound there, on x rounded the same way

Every op maps x [M, K] -> [M, N] in x's dtype and reports the bytes one call reads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine import kernels
from engine.quant import QuantStack, QuantTensor, round_like_kernels

# Rows of x at or below which QuantLinear uses the block kernel; above, dequantize + dense GEMM.
# Decode batches sit below it, prefill chunks above (measured in bench/engine_bench.py).
QUANT_KERNEL_MAX_ROWS = 64


class DenseLinear:
    """weight [N, K]; or a stack [L, N, K] of every layer's, `layer` naming this one (stack_layers)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, prepack: bool = True,
                 layer: int | None = None, packed: torch.Tensor | None = None) -> None:
        """packed: the pack, made earlier (stack_layers); with `layer`, that layer's own (a library's pack cannot
        be stacked) or every layer's float32 panels stacked [layers, N/16, K, 16]."""
        if (layer is None) != (weight.dim() == 2):
            raise ValueError("a [layers, N, K] stack needs the layer it serves; an [N, K] weight takes none")
        self._w: torch.Tensor | None = weight
        self.layer = layer
        self._view = weight[layer] if layer is not None else None  # eager calls reuse this view
        w = self.weight
        self.out_features, self.in_features = w.shape
        self.bias = bias
        self.nbytes = w.numel() * w.element_size()
        self._p = packed if packed is not None else _prepack(w) if prepack and layer is None else None
        stacked = layer is not None and self._p is not None and not self._p.is_mkldnn and self._p.dim() == 4
        self._p_view = self._p[layer] if stacked else None
        if self._p is not None and w.dtype == torch.bfloat16 and not kernels.bf16_gemv():
            self._w = None  # the packed copy replaces it

    @property
    def weight(self) -> torch.Tensor | None:
        """[N, K], or None where only the packed copy is kept. From a stack: inside a compiled step a view made
        in the graph (the stack is its one input), elsewhere one view made once."""
        if self.layer is None or self._w is None:
            return self._w
        return self._w[self.layer] if torch.compiler.is_compiling() else self._view

    @property
    def packed(self) -> torch.Tensor | None:
        """The prepacked copy (a oneDNN pack, or float32 panels [N/16, K, 16]; from a stack of panels: a view,
        made like weight's), or None."""
        if self._p_view is None:
            return self._p
        return self._p[self.layer] if torch.compiler.is_compiling() else self._p_view

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            if kernels.load():  # one opaque op (torch.compile keeps it) that picks the kernel by the row count
                return torch.ops.distserve.packed_linear(x, self.packed, self.bias, self.weight)
            if self.weight is None:  # a bf16 weight that only oneDNN's pack holds
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def dense(self) -> torch.Tensor:
        """The weight as a plain tensor (for tests and exports)."""
        if self.weight is not None:
            return self.weight
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return self(eye).t().contiguous() if self.bias is None else (self(eye) - self.bias).t().contiguous()


class QuantLinear:
    """weight: the matrix, or a stack of every layer's with `layer` naming this one (engine/quant.py QuantStack:
    a compiled step then reads it as a view of one input)."""

    def __init__(self, weight: QuantTensor | QuantStack, bias: torch.Tensor | None, dtype: torch.dtype,
                 layer: int | None = None) -> None:
        if (layer is None) != isinstance(weight, QuantTensor):
            raise ValueError("a QuantStack needs the layer it serves; a QuantTensor takes none")
        if isinstance(weight, QuantTensor) and kernels.int16_products():
            weight = weight.interleave()  # the vector kernels' layout (a stack is made of interleaved ones)
        self.weight, self.layer = weight, layer
        self._view = weight.layer(layer) if layer is not None else None  # eager calls reuse these views
        self.out_features, self.in_features = self.q.shape
        self.bias, self.dtype = bias, dtype
        self.nbytes = self.q.nbytes

    @property
    def q(self) -> QuantTensor:
        """The matrix. From a stack: inside a compiled step views made in the graph, elsewhere views made once."""
        if self.layer is None:
            return self.weight
        return self.weight.layer(self.layer) if torch.compiler.is_compiling() else self._view

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= QUANT_KERNEL_MAX_ROWS:
            y = self.q.matmul(x).to(x.dtype)
            return y + self.bias if self.bias is not None else y
        return F.linear(round_like_kernels(x), self.q.dequantize().to(x.dtype), self.bias)


def stack_layers(ops: list[DenseLinear | QuantLinear]) -> list[DenseLinear | QuantLinear]:
    """Every layer's op for one fused matrix, as views of one stack where the layers allow it (one kind of
    blocks and shape; dense: one shape and dtype, on a CPU, with the row-major copy kept), else `ops` unchanged
    (a prepack cannot be stacked or moved: each stays its layer's own input, beside the stacked row-major
    copies; bf16 weights whose pack replaces them stay apart; on a GPU the stack, built beside the layers'
    copies, could outgrow its memory). A compiled
    step takes each tensor it reads as an input, and torch.compile's runtime pays ~0.7 us of Python per input
    on every call (a 430-input toy graph: 312 vs 24 us with one input); views made inside the traced step
    cost nothing."""
    if all(isinstance(op, QuantLinear) for op in ops):
        stack = QuantStack.of([op.q for op in ops])
        if stack is not None:
            return [QuantLinear(stack, op.bias, op.dtype, layer=i) for i, op in enumerate(ops)]
    elif (all(isinstance(op, DenseLinear) and op.weight is not None and op.weight.device.type == "cpu" for op in ops)
          and len({(op.weight.shape, op.weight.dtype) for op in ops}) == 1):
        stack = torch.stack([op.weight for op in ops])  # [layers, N, K]
        packs = [op.packed for op in ops]
        if all(p is not None and not p.is_mkldnn for p in packs):  # float32 panels
            panel_stack = torch.stack(packs)  # [layers, N/16, K, 16]
            return [DenseLinear(stack, op.bias, layer=i, packed=panel_stack) for i, op in enumerate(ops)]
        return [DenseLinear(stack, op.bias, layer=i, packed=op.packed) for i, op in enumerate(ops)]
    return ops


def _prepack(w: torch.Tensor) -> torch.Tensor | None:
    """w [N, K] in the layout of the CPU kernel that multiplies decode batches by it, or None where none applies.
    bf16: oneDNN's opaque pack, which must stay where it was made (never cloned, pickled or moved; Ray actors
    load their own weights and pack them there). float32: panels(), where the engine's kernels are built."""
    if w.device.type != "cpu":
        return None
    if w.dtype == torch.bfloat16 and _mkldnn_bf16():
        return torch.ops.mkldnn._reorder_linear_weight(w, 1)  # oneDNN
    if w.dtype == torch.float32 and kernels.float32_panels() and w.shape[0] % PANEL == 0:
        return panels(w)
    return None


PANEL = 16  # weight rows per panel (engine/cpu_kernels.cpp panel_linear)


def panels(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] (N a multiple of 16) as panels of 16 rows, K-major: [N/16, K, 16], p[i, k, j] = w[16i + j, k]."""
    n, k = w.shape
    return w.view(n // PANEL, PANEL, k).transpose(1, 2).contiguous()


def _mkldnn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
