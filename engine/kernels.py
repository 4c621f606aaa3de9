"""The engine's own CPU kernels (engine/cpu_kernels.cpp): GGUF Q4_0 / Q4_1 / Q8_0 matmuls on the file's
blocks (engine/quant.py reads them and interleaves them by rows for the vector kernels), a register-tiled
float32 product on weights packed in panels of 16 rows (decode batches), and a streaming bf16 GEMV for batches
of 1-4 rows. Built once per machine with the system C++ compiler (-march=native), cached on
disk; where no compiler is found, `available()` is False and the engine uses torch's own kernels instead.

    ok = kernels.load()           # False if the build failed (the reason is in kernels.load_error())
    y = QuantTensor.from_blocks(raw, "Q4_1", K).interleave().matmul(x)   # x [M, K] -> float32 [M, N]
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
GGUF_KINDS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # per 32 values
_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_bf16")

_lock = threading.Lock()
_state: dict = {}


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def march() -> str:
    """The -march the kernels are built for: native, or $DISTSERVE_KERNEL_MARCH (tests build the AVX2
    path on an AVX-512 machine with 'haswell')."""
    return os.environ.get("DISTSERVE_KERNEL_MARCH", "native")


def flag_tag() -> str:
    """This CPU's vector flags as a name ('avx2-fma-f16c-avx512f-...'), for caches of machine code."""
    flags = cpu_flags()
    return "-".join(f for f in _FLAGS if f in flags) or "generic"


def build_dir() -> Path:
    """Where the build lives: $DISTSERVE_KERNEL_DIR, else ~/.cache/distserve/kernels. The name carries
    the source hash, -march and this CPU's vector flags, so a cache shared between machines never loads
    a binary built for another instruction set."""
    key = SOURCE.read_bytes() + flag_tag().encode() + march().encode() + torch.__version__.encode()
    digest = hashlib.sha1(key).hexdigest()[:12]
    root = Path(os.environ.get("DISTSERVE_KERNEL_DIR", Path.home() / ".cache" / "distserve" / "kernels"))
    return root / f"distserve_kernels_{digest}"


def load() -> bool:
    """Build (first time on this machine, ~30-60 s) or load the kernels; True when they are usable.
    Safe to call from several threads; the outcome is remembered for the process."""
    if "ok" in _state:  # lock-free once known (and traceable by torch.compile)
        return _state["ok"]
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _build()
        return _state["ok"]


def available() -> bool:
    return load()


def load_error() -> str | None:
    return _state.get("error")


def isa() -> str:
    """The vector path compiled in: avx512(+bf16), avx2 or scalar ('' before a successful load)."""
    return _state.get("isa", "")


def _vector_build() -> bool:
    return load() and isa() != "scalar"


def int16_products() -> bool:
    """quant_linear rounds x to int16 per block (the vector builds); False: float32 products (scalar build)."""
    return _vector_build()


def float32_panels() -> bool:
    """panel_linear's register-tiled float32 kernel is built (the vector builds; the scalar one falls back)."""
    return _vector_build()


def decode_attention(dtype: torch.dtype, head_dim: int) -> bool:
    """distserve::decode_attention runs heads of this size in this dtype (the vector builds: float32 and bf16,
    head_dim 2, 4, 8 or 16 vectors wide)."""
    return load() and torch.ops.distserve.decode_attention_supported(dtype, head_dim)


def bf16_gemv() -> bool:
    """The streaming bf16 GEMV for batches of 1-4 rows is built in (AVX-512 BF16)."""
    return load() and isa().endswith("+bf16")


def _build() -> bool:
    if os.environ.get("DISTSERVE_KERNELS", "1") == "0":
        _state["error"] = "disabled by DISTSERVE_KERNELS=0"
        return False
    try:
        from torch.utils import cpp_extension

        out = build_dir()
        out.mkdir(parents=True, exist_ok=True)
        lib = out / f"{out.name}.so"
        if not lib.exists():
            log.info("building the engine's CPU kernels in %s (once per machine)", out)
            cpp_extension.load(name=out.name, sources=[str(SOURCE)], build_directory=str(out),
                               extra_cflags=["-O3", f"-march={march()}", "-fopenmp"], extra_ldflags=["-fopenmp"],
                               is_python_module=False, verbose=False)
        else:
            torch.ops.load_library(str(lib))
        _state["isa"] = _isa_of(lib)
        _register_fakes()
        return True
    except Exception as e:  # no compiler, no ninja, a failed build: the torch fallbacks still run
        _state["error"] = f"{type(e).__name__}: {e}"[:2000]
        log.warning("engine CPU kernels unavailable, using torch's: %s", _state["error"][:300])
        return False


def _isa_of(lib: Path) -> str:
    fn = ctypes.CDLL(str(lib)).distserve_kernels_isa
    fn.restype = ctypes.c_char_p
    return fn().decode()


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing (the ops are opaque calls inside a compiled graph)."""
    if _state.get("fakes"):
        return

    @torch.library.register_fake("distserve::quant_linear")
    def _(x, qs, d, m, kind, K):
        return x.new_empty((x.shape[0], qs.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("distserve::quant_linear_rows")
    def _(x, qs, d, m, kind, K, N):
        return x.new_empty((x.shape[0], N), dtype=torch.float32)

    @torch.library.register_fake("distserve::quant_dequant_rows")
    def _(qs, d, m, kind, K, N):
        return d.new_empty((N, K), dtype=torch.float32)

    @torch.library.register_fake("distserve::round_int16")
    def _(x):
        return x.new_empty(x.shape, dtype=torch.float32)

    @torch.library.register_fake("distserve::quant_dequant")
    def _(qs, d, m, kind, K):
        return d.new_empty((qs.shape[0], K), dtype=torch.float32)

    @torch.library.register_fake("distserve::packed_linear")
    def _(x, w, b, wr=None):  # panels [N/16, K, 16] or a oneDNN pack [N, K]: N from the row-major copy if given
        return x.new_empty((*x.shape[:-1], (wr if wr is not None else w).shape[0]))

    @torch.library.register_fake("distserve::decode_attention")
    def _(q, k, v, k_cache, v_cache, tables, ctx_lens, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("distserve::panel_linear")
    def _(x, wp, b):
        return x.new_empty((x.shape[0], wp.shape[0] * wp.shape[2]), dtype=torch.float32)

    _state["fakes"] = True
