"""The AsyncEngine: the instances of a layout, driven by one asyncio loop.

    add_request ──> Cluster.add (least-loaded prefill/colocated instance)
        ──> per instance, a driver task (serving/driver.py): next_action -> execute on the worker -> executed
    tokens ──> OutputProcessor (serving/outputs.py) ──> the request's async stream

Every decision and every piece of request bookkeeping is the Cluster's (shared with the simulator); the
drivers perform its actions on the workers (serving/workers.py: threads here, or Ray actors); this file wires
the parts together and is the engine's public API (serving.api.EngineClient).
"""
from __future__ import annotations

import itertools
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import torch

from engine.config import EngineConfig, SamplingParams
from engine.instance import GIL_SWITCH_INTERVAL_S, Worker
from engine.loader import Checkpoint, load_checkpoint
from engine.request import Request
from engine.stop import StopRule
from scheduler.runtime.cluster import Cluster, Slot
from scheduler.runtime.policy import make_policy
from scheduler.runtime.trace import StepTrace
from serving.api import EngineUnavailableError, InstanceStats, QueueFullError, RequestOutput
from serving.driver import Drivers
from serving.outputs import OutputProcessor
from serving.workers import build_workers


class AsyncEngine:
    """Implements serving.api.EngineClient."""

    def __init__(self, config: EngineConfig | None = None, checkpoint: Checkpoint | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 wrap: Callable[[Worker], Worker] | None = None) -> None:
        """clock: seconds for every timestamp (request metrics, step trace); tests pass a virtual one.
        wrap: applied to each instance's worker (tests inject faults with it)."""
        self.config = config = config or EngineConfig()
        self.clock = clock
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        ckpt = checkpoint or load_checkpoint(config.model)
        self.model_name, self.model_config, self.tokenizer = ckpt.name, ckpt.config, ckpt.tokenizer
        self.max_model_len = ckpt.config.max_position_embeddings
        self.rule = StopRule(frozenset(ckpt.config.eos_token_ids), self.max_model_len)
        self.workers = build_workers(config, ckpt, wrap)  # threads here, or Ray actors (config.cluster)
        self.instances: list[Worker] = self.workers.instances
        self.dtype = self.instances[0].pool.dtype
        self.slots = [Slot(i.name, i.role, make_policy(i.role, config.scheduler, i.pool.allocator, self.rule,
                                                       config.chunked_prefill,
                                                       config.swap_space_bytes // i.pool.block_bytes),
                           i.pool.allocator) for i in self.instances]
        self.outputs = OutputProcessor(self.tokenizer, self.rule, config.max_stream_lag)
        self.step_trace = StepTrace(config.step_trace) if config.step_trace else None
        self.cluster = Cluster(self.slots, clock, self._notify, self.outputs, self.step_trace)
        self.drivers = Drivers(self.cluster, self.workers, self.outputs, config.faults)
        self._ids = itertools.count()
        self.closed = False

    # ---------------- public API ----------------
    async def start(self) -> None:
        """Start one driver task per instance on the running event loop."""
        self.drivers.start()

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival: float | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request; returns the async iterator of its outputs. ValueError on bad input.

        Closing the iterator aborts the request; a caller that never iterates it must call abort().
        """
        down = "engine is shut down" if self.closed else self.cluster.unavailable()
        if down:
            raise EngineUnavailableError(down)
        params = replace(params or SamplingParams())  # ours to fill in: the caller's stays as it was
        ids = self.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
        self.validate(ids, params)
        self._admit(len(ids))
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.cluster.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - len(ids)
        req = Request(request_id, ids, params, self.clock() if arrival is None else arrival)
        if params.seed is not None:
            req.generator = torch.Generator().manual_seed(params.seed)
        stream = self.outputs.open(req, self.abort)
        self.cluster.add(req)
        return stream

    def _admit(self, prompt_tokens: int) -> None:
        """The admission bounds, over the requests not decoding yet: QueueFullError beyond max_waiting of them,
        or beyond max_waiting_tokens of their prompt tokens (one prompt alone always fits)."""
        cfg = self.config.scheduler
        waiting, tokens = self.cluster.queued()
        if waiting >= cfg.max_waiting:
            raise QueueFullError(f"admission queue full ({waiting} requests waiting)")
        if cfg.max_waiting_tokens is not None and tokens and tokens + prompt_tokens > cfg.max_waiting_tokens:
            raise QueueFullError(f"admission queue full ({tokens} prompt tokens waiting)")

    def validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.model_config.vocab_size}): {bad[:5]}")
        total = len(ids) + (params.max_tokens or 1)
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the "
                             f"context window of {self.max_model_len} tokens")
        smallest = min(i.pool.num_blocks * i.pool.block_size for i in self.instances)
        if total > smallest:
            raise ValueError(f"prompt + max_tokens = {total} tokens exceeds the smallest KV pool ({smallest} tokens)")

    def abort(self, request_id: str) -> None:
        """Cancel in any phase; every block the request holds is freed (now, or when its step ends)."""
        self.cluster.abort(request_id)

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> RequestOutput:
        final = None
        async for out in self.add_request(prompt, params, request_id):
            final = out
        return final

    def stats(self) -> list[InstanceStats]:
        out = []
        for s, inst in zip(self.slots, self.instances):
            c = self.cluster.counts(s)
            out.append(InstanceStats(s.name, s.role, inst.spec, s.allocator.num_used, s.allocator.num_blocks,
                                     c.waiting, c.prefilling, c.migrating, c.running, c.swapped, len(s.in_flight),
                                     s.state, s.faults))
        return out

    def check(self) -> None:
        """Integrity of every pool (tests call this after each scenario)."""
        self.cluster.check()

    async def shutdown(self) -> None:
        self.closed = True
        for req in list(self.cluster.requests.values()):
            req.aborted = "abort"
            self.outputs.explain(req.id, "the server is shutting down")
        await self.drivers.stop()
        for req in list(self.cluster.requests.values()):
            self.cluster.finish(req, "abort")

    @property
    def hung(self) -> list[str]:
        """Instances whose thread is stuck in a step or pull (a process holding one cannot exit cleanly)."""
        return [s.name for s in self.slots if s.state == "hung"]

    def _notify(self, slot: Slot) -> None:
        self.drivers.notify(slot)
