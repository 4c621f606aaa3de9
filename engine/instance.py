"""One device's worker: the device (or a core set), its KV pool, its stream, and one executor thread.

`run(step)` is blocking and runs on the instance's thread: swap copies, one forward pass over the
step's packed tokens, sampling. Request state is updated by the caller (the event loop) from what
it returns, never from this thread, so the asyncio side stays the single writer.
`build_instances(config, checkpoint)` makes the instances of a layout, one copy of the weights per
physical device.
"""
from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

import torch

from engine.attention import AttentionMetadata, make_backend
from engine.compile import decode_inputs
from engine.config import CacheConfig, EngineConfig, parse_device
from engine.kv_cache import KVPool
from engine.loader import Checkpoint
from engine.model import LlamaModel
from engine.omp import off_main_thread
from engine.precision import build_model, resolve
from engine.sampler import Sampler
from engine.step import Sampled, Step, StepBatch, TokenLogprobs, pack

# Instances are threads of one process. A thread returning from a torch op (GIL released) waits for
# the GIL until the thread holding it drops it, forced after the switch interval (CPython: 5 ms). A
# forward is hundreds of small ops, so two busy instances slowed each other ~2x (decode next to a
# prefill, measured by bench/simulator_fidelity.py's investigation); 0.2 ms cuts that to ~1.2x.
GIL_SWITCH_INTERVAL_S = 2e-4


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


T = TypeVar("T")


class WorkerDied(RuntimeError):
    """The process behind a worker is gone (a Ray actor that died): `worker` names it. Raised by its calls,
    or by a KV pull whose source it was."""

    def __init__(self, worker: str, detail: str) -> None:
        super().__init__(f"instance {worker} died: {detail}")
        self.worker = worker


class Worker(Protocol):
    """An instance as the engine drives it: Instance (a pinned thread of this process, below), or a worker
    elsewhere behind the same methods (serving/ray_cluster.py: a Ray actor). Awaiting them never blocks the
    event loop."""

    name: str
    role: str  # prefill | decode | colocated
    spec: str  # the device string it was built for
    pool: KVPool  # its block allocator and shape; the tensor itself may live in the worker's process

    async def execute(self, step: Step) -> list[Sampled]:
        """Swap copies, one forward pass over the step, sampling."""
        ...

    async def call(self, fn: Callable[..., T], *args) -> T:
        """Run fn(*args) where the instance runs (e.g. a KV copy into its pool), in order with its steps."""
        ...

    def close(self) -> None: ...


class Instance:
    """A Worker on a thread of this process, pinned to its cores (CPU) or on its own CUDA stream."""

    def __init__(self, name: str, role: str, device: str, model: LlamaModel, cache: CacheConfig,
                 attention: str = "auto", allocate: Callable | None = None) -> None:
        """allocate: where the KV pool's memory comes from (engine.kv_cache.KVPool; default: torch.zeros)."""
        self.name, self.role, self.spec = name, role, device
        kind, _ = parse_device(device)
        self.device = torch.device(device if kind == "cuda" else "cpu")
        self.cores = cpu_cores(device) if kind == "cpu" else None
        self.model = model
        self.attention = make_backend(attention, self.device)
        self.pool = KVPool(model.cfg, cache, model.dtype, self.device, name=name, allocate=allocate)
        self.sampler = Sampler(model.cfg.vocab_size, self.device, eos_ids=model.cfg.eos_token_ids)
        self.stream = torch.cuda.Stream(self.device) if kind == "cuda" else None
        self.thread_id: int | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=self.pin_thread)
        self.compiled = model.compiled  # engine/compile.py CompiledDecode, or None: eager
        if self.compiled is not None:  # compile (or load) before the first step, on this instance's thread
            self.executor.submit(self.compiled.warmup, self.pool.cache, 64)

    def pin_thread(self) -> None:
        """Pin the calling thread to the instance's cores and size torch's intra-op pool to them (per-thread on
        OpenMP); on CUDA make its device current. Its executor thread runs this first."""
        self.thread_id = threading.get_native_id()
        if self.cores is not None:
            os.sched_setaffinity(0, self.cores)  # pid 0 = the calling thread
            torch.set_num_threads(len(self.cores))
        elif self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def execute(self, step: Step) -> list[Sampled]:
        return await self.call(self.run, step)

    async def call(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- runs on the instance thread ----
    def run(self, step: Step) -> list[Sampled]:
        return self.on_device(self._run, step)

    def on_device(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on the instance's CUDA stream, done when it returns (on a CPU: just fn(*args))."""
        if self.stream is None:
            return fn(*args)
        with torch.cuda.stream(self.stream):
            out = fn(*args)
        self.stream.synchronize()
        return out

    @torch.inference_mode()
    def _run(self, step: Step) -> list[Sampled]:
        for req, blocks in step.swap_out:  # before the forward: these blocks may be reused now
            req.swapped = self.save_blocks(blocks)
        for req in step.swap_in:  # its new table may be longer: room for the tokens still to come
            self.load_blocks(req.swapped, req.block_table)
            req.swapped = None
        if not step.items:
            return []
        batch = pack(step)
        tokens, logprobs = self.forward(batch)
        return [Sampled(r, t, lp) for r, t, lp in zip(batch.samplers, tokens, logprobs)]

    def save_blocks(self, blocks: list[int]) -> torch.Tensor:
        """A host copy of these blocks of the pool."""
        return self.pool.cache[torch.tensor(blocks, device=self.device)].to("cpu")

    def load_blocks(self, host: torch.Tensor, table: list[int]) -> None:
        """A host copy back into the first len(host) blocks of table."""
        self.pool.cache[torch.tensor(table[:host.shape[0]], device=self.device)] = host.to(self.device)

    @torch.inference_mode()
    def forward(self, b: StepBatch) -> tuple[list[int], list[TokenLogprobs | None]]:
        """One forward pass over the packed batch, then sampling of its rows."""
        dev = self.device
        dec = decode_inputs(b.q_lens, b.ctx_lens, b.tables, self.pool.block_size, dev) if self.compiled else None
        if dec is not None:  # decode-only: the compiled step; it returns the new K/V and we write them here
            table, slot_blocks, slot_offsets = dec
            cache = self.pool.cache
            logits, k, v = self.compiled(torch.tensor(b.ids, device=dev), torch.tensor(b.pos, device=dev), table,
                                         torch.tensor(b.ctx_lens, device=dev), cache)
            cache[slot_blocks, :, 0, slot_offsets] = k  # [B, layers, KVH, D] into each slot of every layer
            cache[slot_blocks, :, 1, slot_offsets] = v
            if len(b.rows) < len(b.ids):  # a 1-token prompt chunk that does not sample yet
                logits = logits[torch.tensor(b.rows, dtype=torch.long, device=dev)]
        else:
            meta = AttentionMetadata.build(b.q_lens, b.ctx_lens, b.tables, self.pool.block_size, dev,
                                           self.model.dtype)
            logits = self.model.forward(torch.tensor(b.ids, device=dev), torch.tensor(b.pos, device=dev), meta,
                                        [self.pool.layer(i) for i in range(self.model.cfg.num_layers)],
                                        torch.tensor(b.rows, dtype=torch.long, device=dev), self.attention)
        if not b.samplers:
            return [], []
        return self.sampler(logits, b.samplers)


def layout(config: EngineConfig) -> list[tuple[str, str, str, CacheConfig]]:
    """(name, role, device, KV pool config) per instance, named role + index ("prefill0", "decode1")."""
    specs = ([("prefill", d) for d in config.prefill_devices] + [("decode", d) for d in config.decode_devices]
             if config.mode == "disagg" else [("colocated", d) for d in config.devices])
    return [(f"{role}{i}", role, dev, config.decode_cache if role == "decode" and config.decode_cache else config.cache)
            for i, (role, dev) in enumerate(specs)]


def build_instances(config: EngineConfig, ckpt: Checkpoint) -> list[Instance]:
    """The layout's instances as threads of this process, one copy of the weights per physical device and precision
    (built off the main thread: see off_main_thread)."""
    return off_main_thread(lambda: _build_instances(config, ckpt))


def _build_instances(config: EngineConfig, ckpt: Checkpoint) -> list[Instance]:
    models: dict[tuple[str, torch.dtype, bool], LlamaModel] = {}
    out = []
    for name, role, dev, cache in layout(config):
        kind, idx = parse_device(dev)
        device = "cpu" if kind == "cpu" else f"cuda:{idx}"
        dtype, weights = config.precision(role)
        key = (device, *resolve(ckpt, dtype, weights, device))  # one copy per device and precision
        if key not in models:
            models[key] = build_model(ckpt, dtype, weights, torch.device(device), config.compile)
        out.append(Instance(name, role, dev, models[key], cache))
    return out
