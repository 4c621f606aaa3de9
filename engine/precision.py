"""What a model computes in, chosen per machine: the activation / KV dtype and the weight format.

    weights  dense   every matrix in the activation dtype (bf16 prepacked for oneDNN on CPUs with it)
             native  the checkpoint's own GGUF blocks (Q4_0 / Q4_1 / Q8_0) through engine/cpu_kernels.cpp;
                     activations in float32, so the result is the dense float32 model's up to rounding
             auto    dense when the activations are bfloat16 (a CPU with AVX-512 BF16 / AMX, or CUDA), else
                     native when the checkpoint has native blocks and the kernels build here, else dense
    dtype    auto    native: float32; dense: bfloat16 where the CPU has AVX-512 BF16 / AMX (or on CUDA),
                     float32 elsewhere (emulated bf16 matmuls run 16-100x slower than float32)

Why auto is so (bench/RESULTS.md, Sapphire Rapids, 2 threads): on a CPU with AVX-512 BF16 / AMX dense bf16 wins
prefill (3,161 vs 1,001 tok/s, AMX) and ties decode batch 32 (835 vs 812); native wins decode batch 1 and 8 (185 /
600 vs 67 / 355 tok/s, weights interleaved by rows, 2026-12-02 10:55), so auto keeps bf16 there, which keeps the
prompts' time-to-first-token low, and `weights="native"` serves a mostly-decoding load faster. Without bf16 in
hardware (emulated AVX2, 10:44 and 05:36) native beats dense float32 everywhere (1.78x llama.cpp at batch 1
against float32's 1.07x; 528 vs 372 tok/s at batch 32) and holds a tenth of the bytes (float32 keeps its panels
beside each matrix): native is the default there.
"""
from __future__ import annotations

import torch

from engine import kernels
from engine.loader import Checkpoint
from engine.memory import tune_malloc_for_serving
from engine.model import LlamaModel

WEIGHTS = ("auto", "dense", "native")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def cpu_has_bf16() -> bool:
    flags = kernels.cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device, native: bool = False) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16
    if native:
        return torch.float32
    return torch.bfloat16 if torch.backends.mkldnn.is_available() and cpu_has_bf16() else torch.float32


def resolve_weights(name: str, ckpt: Checkpoint, device: torch.device, dtype: str = "auto") -> bool:
    """True: run the checkpoint's quantized matrices natively. ValueError when 'native' cannot be."""
    if name not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {name!r}")
    if name == "dense" or (name == "auto" and resolve_dtype(dtype, device) == torch.bfloat16):
        return False
    why = ("the checkpoint has no Q4_0 / Q4_1 / Q8_0 tensors" if not ckpt.quantized
           else "native weights run on CPU only" if device.type != "cpu"
           else f"the CPU kernels did not build: {kernels.load_error()}" if not kernels.load() else None)
    if why and name == "native":
        raise ValueError(f"--weights native: {why}")
    return why is None


def resolve(ckpt: Checkpoint, dtype: str, weights: str, device: torch.device | str) -> tuple[torch.dtype, bool]:
    """(the activation dtype, native weights?) that dtype / weights ('auto' or explicit) come to on device."""
    device = torch.device(device)
    native = resolve_weights(weights, ckpt, device, dtype)
    return resolve_dtype(dtype, device, native), native


def build_model(ckpt: Checkpoint, dtype: str = "auto", weights: str = "auto",
                device: torch.device | str = "cpu", compile: bool = False) -> LlamaModel:
    """compile: decode steps through torch.compile (engine/compile.py); the first start on a machine
    spends minutes compiling, later starts load the result from the disk cache."""
    device = torch.device(device)
    torch_dtype, native = resolve(ckpt, dtype, weights, device)
    model = LlamaModel(ckpt.config, ckpt.weights, torch_dtype, device, quantized=ckpt.quantized, native=native)
    if compile:
        from engine.compile import CompiledDecode

        model.compiled = CompiledDecode(model)
    tune_malloc_for_serving()  # loading is over: from here on, reuse activation buffers
    return model
