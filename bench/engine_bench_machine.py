"""What the machine can do, measured in the same run as the engine bench: matmul peak (FLOP/s),
memory bandwidth (a large copy, and a chain of GEMVs shaped like the model's decode), and the
process's memory (RSS now, peak since the last reset)."""
from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from engine.config import ModelConfig


def best_time(fn: Callable[[], object], iters: int) -> float:
    """Fastest of `iters` calls after one warm-up: the least disturbed by other load on a shared box."""
    fn()
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_flops(dtype: torch.dtype, n_max: int = 2048, budget_s: float = 0.5, iters: int = 3) -> tuple[float, int]:
    """(FLOP/s, n) of F.linear([n, n], [n, n]): 2 n^3 flops, weights laid out [out, in] as both systems
    keep them (torch.mm on a row-major right operand takes a much slower bf16 path on AVX2). n doubles
    from 256 up to n_max while one call stays under budget_s: bf16 without hardware support is ~100x
    slower here, and a 2048^3 one would take most of a minute."""
    n = 256
    while True:
        x, w = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        t = best_time(partial(F.linear, x, w), 1)
        if n >= n_max or t * 8 > budget_s:
            break
        n *= 2
    return 2 * n**3 / best_time(partial(F.linear, x, w), iters), n


def copy_bandwidth(nbytes: int = 256 * 2**20, iters: int = 5) -> float:
    """Bytes/s of a large tensor copy, counting read + write."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * nbytes / best_time(lambda: dst.copy_(src), iters)


def decode_matrices(cfg: ModelConfig, dtype: torch.dtype) -> list[torch.Tensor]:
    """Random [out, in] weights with the shapes one decode step reads: fused qkv, o, fused gate/up,
    down per layer, then the LM head."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes = [(q + 2 * kv, h), (h, q), (2 * f, h), (h, f)] * cfg.num_layers + [(cfg.vocab_size, h)]
    return [torch.randn(s).to(dtype) for s in shapes]


def gemv_bandwidth(cfg: ModelConfig, dtype: torch.dtype, iters: int = 5) -> float:
    """Bytes/s of weights read by a chain of [1, in] @ [in, out] GEMVs shaped like one decode step:
    what the dense kernels can stream, short of the copy roofline."""
    mats = decode_matrices(cfg, dtype)
    xs = {m.shape[1]: torch.randn(1, m.shape[1]).to(dtype) for m in mats}

    def chain() -> None:
        for m in mats:
            F.linear(xs[m.shape[1]], m)

    nbytes = sum(m.numel() * m.element_size() for m in mats)
    return nbytes / best_time(chain, iters)


def machine_peaks(cfg: ModelConfig, dtype: torch.dtype, quick: bool = False) -> dict:
    n_max = 1024 if quick else 2048
    flops, n = matmul_flops(dtype, n_max)
    flops_bf16, n_bf16 = (flops, n) if dtype == torch.bfloat16 else matmul_flops(torch.bfloat16, n_max)
    return {"matmul_n": n, "matmul_flops": flops, "matmul_n_bf16": n_bf16, "matmul_flops_bf16": flops_bf16,
            "copy_bandwidth": copy_bandwidth(64 * 2**20 if quick else 256 * 2**20),
            "gemv_bandwidth": gemv_bandwidth(cfg, dtype, iters=2 if quick else 5)}


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "python": platform.python_version()}


# ---- memory of this process ----
def _status_kb(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """Peak RSS since the last reset_peak_rss (VmHWM)."""
    kb = _status_kb("VmHWM")
    return kb * 1024 if kb is not None else None


def lifetime_peak_rss_bytes() -> int:
    """ru_maxrss: the whole process's peak, loading included (never reset)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
