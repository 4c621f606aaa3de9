"""One device's worker: the device (or a core set), its KV pool, its stream, and one executor thread.

`run(step)` is blocking and runs on the instance's thread: swap copies, one forward pass over the
step's packed tokens, sampling. Request state is updated by the caller (the event loop) from what
it returns, never from this thread, so the asyncio side stays the single writer.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, make_backend
from engine.compile import decode_inputs
from engine.config import CacheConfig, parse_device
from engine.kv_cache import KVPool
from engine.model import LlamaModel
from engine.request import Request
from engine.sampler import Sampler
from scheduler.batch import Step


@dataclass
class Sampled:
    req: Request
    token: int
    logprobs: dict | None


def cpu_cores(spec: str) -> list[int]:
    """The cores a 'cpu...' device may use, within this process's affinity."""
    _, cores = parse_device(spec)
    allowed = sorted(os.sched_getaffinity(0))
    if cores is None:
        return allowed
    missing = [c for c in cores if c not in allowed]
    if missing:
        raise ValueError(f"device {spec!r}: cores {missing} are not available (this process may use {allowed})")
    return cores


class Instance:
    def __init__(self, name: str, role: str, device: str, model: LlamaModel, cache: CacheConfig,
                 attention: str = "auto") -> None:
        self.name, self.role, self.spec = name, role, device
        kind, _ = parse_device(device)
        self.device = torch.device(device if kind == "cuda" else "cpu")
        self.cores = cpu_cores(device) if kind == "cpu" else None
        self.model = model
        self.attention = make_backend(attention, self.device)
        self.pool = KVPool(model.cfg, cache, model.dtype, self.device, name=name)
        self.sampler = Sampler(model.cfg.vocab_size, self.device)
        self.stream = torch.cuda.Stream(self.device) if kind == "cuda" else None
        self.thread_id: int | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=self._init_thread)
        self.busy: set[str] = set()  # ids of requests inside a step running on the thread now
        self.compiled = getattr(model, "compiled", None)  # engine/compile.py CompiledDecode, or None: eager
        if self.compiled is not None:  # compile (or load) before the first step, on this instance's thread
            self.executor.submit(self.compiled.warmup, self.pool.cache, 64)

    def _init_thread(self) -> None:
        """Pin this thread to its cores and size torch's intra-op pool to them (per-thread on OpenMP)."""
        self.thread_id = threading.get_native_id()
        if self.cores is not None:
            os.sched_setaffinity(0, self.cores)  # pid 0 = the calling thread
            torch.set_num_threads(len(self.cores))
        elif self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    # ---- runs on the instance thread ----
    def run(self, step: Step) -> list[Sampled]:
        if self.stream is None:
            return self._run(step)
        with torch.cuda.stream(self.stream):
            out = self._run(step)
        self.stream.synchronize()
        return out

    @torch.inference_mode()
    def _run(self, step: Step) -> list[Sampled]:
        cache = self.pool.cache
        for req, blocks in step.swap_out:  # before the forward: these blocks may be reused now
            req.swapped = cache[torch.tensor(blocks, device=self.device)].to("cpu")
        for req in step.swap_in:  # its new table may be longer: room for the tokens still to come
            n = req.swapped.shape[0]
            cache[torch.tensor(req.block_table[:n], device=self.device)] = req.swapped.to(self.device)
            req.swapped = None
        if not step.items:
            return []
        ids: list[int] = []
        pos: list[int] = []
        q_lens, ctx_lens, tables, rows, samplers = [], [], [], [], []
        for req, n in step.items:
            start = req.num_computed
            ids.extend(req.all_ids[start:start + n])
            pos.extend(range(start, start + n))
            q_lens.append(n)
            ctx_lens.append(start + n)
            tables.append(req.block_table)
            if start + n == req.num_tokens:  # all known tokens computed: sample the next
                rows.append(len(ids) - 1)
                samplers.append(req)
        dev = self.device
        dec = decode_inputs(q_lens, ctx_lens, tables, self.pool.block_size, dev) if self.compiled else None
        if dec is not None:  # decode-only: the compiled step; it returns the new K/V and we write them here
            table, slot_blocks, slot_offsets = dec
            logits, k, v = self.compiled(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), table,
                                         torch.tensor(ctx_lens, device=dev), cache)
            cache[slot_blocks, :, 0, slot_offsets] = k  # [B, layers, KVH, D] into each slot of every layer
            cache[slot_blocks, :, 1, slot_offsets] = v
            if len(rows) < len(ids):  # a 1-token prompt chunk that does not sample yet
                logits = logits[torch.tensor(rows, dtype=torch.long, device=dev)]
        else:
            meta = AttentionMetadata.build(q_lens, ctx_lens, tables, self.pool.block_size, dev, self.model.dtype)
            logits = self.model.forward(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), meta,
                                        [self.pool.layer(i) for i in range(self.model.cfg.num_layers)],
                                        torch.tensor(rows, dtype=torch.long, device=dev), self.attention)
        if not samplers:
            return []
        tokens, logprobs = self.sampler(logits, samplers)
        return [Sampled(r, t, lp) for r, t, lp in zip(samplers, tokens, logprobs)]
