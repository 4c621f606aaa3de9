"""The model's matrix products, one object per weight, chosen once at load time.

    DenseLinear   the weight in the activation dtype; on CPU in bf16 it is prepacked once for oneDNN
                  (AMX / AVX-512 BF16 kernels, ~1.1-1.3x F.linear from batch 5 up), and where the engine's
                  streaming GEMV is built (AVX-512 BF16) the row-major weight stays too: batches of 1-4
                  rows run on it (~1.5x oneDNN at batch 1), at the price of a second copy in memory
    QuantLinear   a GGUF Q4_0 / Q4_1 / Q8_0 matrix in its own blocks (engine/quant.py): small batches
                  run the int8 kernels of engine/cpu_kernels.cpp; large ones (prefill) dequantize the
                  matrix into the activation dtype and run the dense GEMM, which is compute-bound there

Every op maps x [M, K] -> [M, N] in x's dtype and reports the bytes one call reads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine import kernels
from engine.quant import QuantStack, QuantTensor

# Rows of x at or below which QuantLinear uses the int8 kernel; above, dequantize + dense GEMM.
# Decode batches sit below it, prefill chunks above (measured in bench/engine_bench.py).
QUANT_KERNEL_MAX_ROWS = 64


class DenseLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, prepack: bool = True) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.nbytes = weight.numel() * weight.element_size()
        self.weight: torch.Tensor | None = weight
        self.packed = None
        if prepack and weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and _mkldnn_bf16():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # opaque oneDNN layout
            if not kernels.bf16_gemv():
                self.weight = None  # the packed copy replaces it

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            if kernels.load():  # one opaque op (torch.compile keeps it): GEMV on self.weight for <= 4 rows, else oneDNN
                return torch.ops.distserve.packed_linear(x, self.packed, self.bias, self.weight)
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
        self.weight, self.layer = weight, layer
        self.out_features, self.in_features = self.q.shape
        self.bias, self.dtype = bias, dtype
        self.nbytes = self.q.nbytes

    @property
    def q(self) -> QuantTensor:
        return self.weight if self.layer is None else self.weight.layer(self.layer)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= QUANT_KERNEL_MAX_ROWS:
            y = self.q.matmul(x).to(x.dtype)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.q.dequantize().to(x.dtype), self.bias)


def _mkldnn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def native_available() -> bool:
    """The int8 kernels built and loaded on this machine."""
    return kernels.load()
