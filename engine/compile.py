"""Compiled decode steps: torch.compile of LlamaModel.decode (inductor's CPU backend generates C++ for
everything between the matmuls, and the block lookup of paged attention fuses into its loops).

Shapes are bucketed as CUDA graphs would bucket them, but with two graphs instead of one per size:
batch 1 (static, the latency-critical case) and batch >= 2 (batch and context blocks symbolic); the
context is padded to at least 2 blocks so that short prompts do not specialize a third. Compiled code
is cached on disk by inductor (its FX graph cache, under $TORCHINDUCTOR_CACHE_DIR, by default a folder
per instruction set under ~/.cache/distserve/inductor), so a restart recompiles nothing: measured in bench/RESULTS.md.
Prefill and mixed steps stay eager: they are matmul-bound and their shapes vary too much.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch

from engine import kernels

log = logging.getLogger(__name__)
MIN_BLOCKS = 2  # pad tables to this many columns: nb = 1 would be a specialization of its own


def default_cache_dir() -> str:
    """~/.cache/distserve/inductor/<this CPU's vector flags>[-aten_<ATEN_CPU_CAPABILITY>]: one folder per
    instruction set. inductor's own cache key does not follow ATEN_CPU_CAPABILITY (measured: a cache
    filled at AVX-512 and read with the variable at avx2 made the compiled steps emit wrong tokens), and
    a home folder shared between machines must not hand one CPU's code to another."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    tag = kernels.flag_tag() + (f"-aten_{cap}" if cap else "")
    return str(Path.home() / ".cache" / "distserve" / "inductor" / tag)


def resolve_cache_dir(explicit: str | None = None) -> str:
    """explicit, else $TORCHINDUCTOR_CACHE_DIR as the user set it, else default_cache_dir(). inductor
    writes its own default (/tmp/torchinductor_<user>, one folder for every ISA) into the variable the
    first time anything in the process asks for it, so that value counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default

    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if explicit:
        return explicit
    if env and os.path.abspath(env) != os.path.abspath(inductor_default()):
        return env
    return default_cache_dir()


class CompiledDecode:
    """decode(ids, positions, tables, ctx_lens, cache) -> (logits, k, v), as LlamaModel.decode, compiled."""

    def __init__(self, model, cache_dir: str | None = None) -> None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = resolve_cache_dir(cache_dir)  # inductor reads it when it compiles
        kernels.load()  # decided before tracing: the traced code reads the outcome, never builds
        self.model = model
        # cpp_wrapper: the graph runs as one C++ function that releases the GIL, so a decode step next to
        # another instance's step (disagg, one process) holds the interpreter only to enter and leave
        self.fn = torch.compile(model.decode, fullgraph=True, options={"cpp_wrapper": True})
        self.compile_s: dict[str, float] = {}  # warm-up seconds per graph (a cache hit is a few seconds)
        self._lock = threading.Lock()

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor, ctx_lens: torch.Tensor,
                 cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if tables.shape[1] < MIN_BLOCKS:  # padding columns are masked by ctx_lens
            tables = torch.cat([tables, tables[:, :1].expand(-1, MIN_BLOCKS - tables.shape[1])], dim=1)
        torch._dynamo.maybe_mark_dynamic(tables, 1)
        if ids.shape[0] > 1:
            for t in (ids, positions, tables, ctx_lens):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        with torch.inference_mode():
            return self.fn(ids, positions, tables, ctx_lens, cache)

    def warmup(self, cache: torch.Tensor, max_batch: int) -> float:
        """Compile (or load from the disk cache) both graphs before the first request; returns seconds."""
        t_all = time.perf_counter()
        with self._lock:
            for batch in sorted({1, min(2, max_batch)}):
                if f"batch{batch}" in self.compile_s:
                    continue
                t0 = time.perf_counter()
                with torch.inference_mode():  # as the steps' inputs are made: else their dispatch keys differ,
                    ids = torch.zeros(batch, dtype=torch.long, device=cache.device)  # and the first steps recompile
                    tables = torch.zeros(batch, MIN_BLOCKS + 1, dtype=torch.long, device=cache.device)
                    ctx = torch.ones(batch, dtype=torch.long, device=cache.device)
                    self(ids, ctx - 1, tables, ctx, cache)
                self.compile_s[f"batch{batch}"] = time.perf_counter() - t0
        secs = time.perf_counter() - t_all
        log.info("compiled decode steps ready in %.1f s (%s)", secs, self.compile_s)
        return secs


def decode_inputs(q_lens: list[int], ctx_lens: list[int], tables: list[list[int]], block_size: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(tables [B, nb], slot blocks [B], slot offsets [B]) for a decode-only batch, else None."""
    if not q_lens or any(q != 1 for q in q_lens):
        return None
    used = [-(-c // block_size) for c in ctx_lens]
    width = max(used)
    dense = [t[:u] + [t[0]] * (width - u) for t, u in zip(tables, used)]
    pos = [c - 1 for c in ctx_lens]
    blocks = [t[p // block_size] for t, p in zip(tables, pos)]
    return (torch.tensor(dense, dtype=torch.long, device=device),
            torch.tensor(blocks, dtype=torch.long, device=device),
            torch.tensor([p % block_size for p in pos], dtype=torch.long, device=device))
