"""The AsyncEngine: the instances of a layout, driven by one asyncio loop.

    add_request ──> Cluster.add (least-loaded prefill/colocated instance) ──> per instance, a driver task:
        action = cluster.next_action(slot)          # scheduler/runtime: what to run, or None (sleep until woken)
        Execute(step) -> instance.run on its pinned thread ──> cluster.executed(...)  -> tokens, hand-offs, finishes
        Pull(...)     -> KV copy (transfer/) on the decoder's thread ──> cluster.pulled(...)
    tokens ──> OutputProcessor (serving/outputs.py) ──> the request's async stream

Every decision and every piece of request bookkeeping is the Cluster's (shared with the simulator);
this file only performs actions and wires the parts together.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import torch

from engine.config import EngineConfig, SamplingParams
from engine.instance import GIL_SWITCH_INTERVAL_S, Worker, WorkerDied
from engine.loader import Checkpoint, load_checkpoint
from engine.request import Request
from engine.stop import StopRule
from scheduler.runtime.cluster import Cluster, Execute, Slot, make_policy
from scheduler.runtime.trace import StepTrace
from serving.api import InstanceStats, QueueFullError, RequestOutput
from serving.outputs import OutputProcessor
from serving.workers import build_workers

log = logging.getLogger("engine")


class AsyncEngine:
    """Implements serving.api.EngineClient."""

    def __init__(self, config: EngineConfig | None = None, checkpoint: Checkpoint | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """clock: seconds for every timestamp (request metrics, step trace); tests pass a virtual one."""
        self.config = config = config or EngineConfig()
        self.clock = clock
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        ckpt = checkpoint or load_checkpoint(config.model)
        self.model_name, self.model_config, self.tokenizer = ckpt.name, ckpt.config, ckpt.tokenizer
        self.max_model_len = ckpt.config.max_position_embeddings
        self.rule = StopRule(frozenset(ckpt.config.eos_token_ids), self.max_model_len)
        self.workers = build_workers(config, ckpt)  # threads here, or Ray actors (config.cluster)
        self.instances: list[Worker] = self.workers.instances
        self.dtype = self.instances[0].pool.dtype
        self.slots = [Slot(i.name, i.role, make_policy(i.role, config.scheduler, i.pool.allocator, self.rule,
                                                       config.chunked_prefill,
                                                       config.swap_space_bytes // i.pool.block_bytes),
                           i.pool.allocator) for i in self.instances]
        self._instance = {s.name: i for s, i in zip(self.slots, self.instances)}
        self.outputs = OutputProcessor(self.tokenizer, self.rule)
        self.step_trace = StepTrace(config.step_trace) if config.step_trace else None
        self.cluster = Cluster(self.slots, clock, self._wake, self.outputs, self.step_trace)
        self.wake: dict[str, asyncio.Event] = {}
        self.tasks: list[asyncio.Task] = []
        self._ids = itertools.count()
        self.closed = False
        self.error: str | None = None

    # ---------------- public API ----------------
    async def start(self) -> None:
        """Start one driver task per instance on the running event loop."""
        self.wake = {s.name: asyncio.Event() for s in self.slots}
        self.tasks = [self._start_driver(s) for s in self.slots]
        self.workers.watch(self._died, self._back)

    def _start_driver(self, slot: Slot) -> asyncio.Task:
        task = asyncio.create_task(self._drive(slot), name=slot.name)
        task.add_done_callback(self._driver_ended)
        return task

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival: float | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request; returns the async iterator of its outputs. ValueError on bad input.

        Closing the iterator aborts the request; a caller that never iterates it must call abort().
        """
        down = self.error or "engine is shut down" if self.closed else self.cluster.unavailable()
        if down:
            raise RuntimeError(down)
        params = replace(params or SamplingParams())  # ours to fill in: the caller's stays as it was
        ids = self.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
        self.validate(ids, params)
        waiting = sum(self.cluster.counts(s).waiting for s in self.cluster.entry)
        if waiting >= self.config.scheduler.max_waiting:
            raise QueueFullError(f"admission queue full ({waiting} waiting)")
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
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for inst in self.instances:
            inst.close()
        self.workers.close()
        for req in list(self.cluster.requests.values()):
            self.cluster.finish(req, "abort")

    # ---------------- driving the instances ----------------
    def _wake(self, slot: Slot) -> None:
        ev = self.wake.get(slot.name)
        if ev is not None:
            ev.set()

    async def _drive(self, slot: Slot) -> None:
        inst = self._instance[slot.name]
        ev = self.wake[slot.name]
        while True:
            action = self.cluster.next_action(slot)
            if action is None:
                await ev.wait()
                ev.clear()
                for _ in range(3):  # a burst of arrivals (e.g. over HTTP) lands in one batch, not two
                    await asyncio.sleep(0)
                continue
            try:
                if isinstance(action, Execute):
                    sampled = await inst.execute(action.step)
                    self.cluster.executed(slot, action.step, sampled)
                else:
                    for pull in action:
                        nbytes = await self.workers.pull(pull)
                        self.cluster.pulled(pull, nbytes)
            except WorkerDied as e:  # this worker's process, or the one a pull read from, is gone
                self._died(e.worker, str(e))
                if e.worker == slot.name:
                    return
                self.cluster.failed(slot, "error")  # the pull's requests: their blocks freed on both sides
            await asyncio.sleep(0)  # let the server's handlers run between steps

    # ---------------- workers that die (Ray actors) ----------------
    def _died(self, name: str, why: str) -> None:
        """A worker's process is gone: what it was running fails, it leaves dispatch ("dead"), and every request
        whose queue or KV was there ends with an error, its blocks freed on the other side. The others go on."""
        slot = next(s for s in self.slots if s.name == name)
        if slot.state != "ok":
            return
        self._fault(slot, why, "dead")
        task = self.tasks[self.slots.index(slot)]
        if task is not asyncio.current_task():
            task.cancel()

    def _back(self, name: str) -> None:
        """A dead worker was restarted (empty, as retire left its pool): back into dispatch."""
        i, slot = next((i, s) for i, s in enumerate(self.slots) if s.name == name)
        self.cluster.restore(slot)
        self.tasks[i] = self._start_driver(slot)

    def _fault(self, slot: Slot, what: str, state: str) -> None:
        """End slot's in-flight requests and take it out of dispatch (issue 14's path, reduced to what a dead
        worker needs)."""
        log.error("instance %s: %s; taken out of dispatch (%s)", slot.name, what, state)
        self.cluster.failed(slot, "error")
        self.cluster.retire(slot, state)
        down = self.cluster.unavailable()
        if down:
            log.error("engine unavailable: %s", down)

    def _driver_ended(self, task: asyncio.Task) -> None:
        """A driver must never die quietly: log it, fail every live request, refuse new ones."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("instance loop %s crashed", task.get_name(), exc_info=task.exception())
        self.closed = True
        self.error = f"instance loop {task.get_name()} crashed: {task.exception()!r}"
        for slot in self.slots:
            slot.in_flight.clear()
        for req in list(self.cluster.requests.values()):
            self.cluster.finish(req, "error")
