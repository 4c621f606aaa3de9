"""The AsyncEngine: the instances of a layout, driven by one asyncio loop.

    add_request ──> Cluster.add (least-loaded prefill/colocated instance) ──> per instance, a driver task:
        action = cluster.next_action(slot)          # scheduler/runtime: what to run, or None (sleep until woken)
        Execute(step) -> instance.run on its pinned thread ──> cluster.executed(...)  -> tokens, hand-offs, finishes
        Pull(...)     -> KV copy (transfer/) on the decoder's thread ──> cluster.pulled(...)
    tokens ──> OutputProcessor (serving/outputs.py) ──> the request's async stream

Every decision and every piece of request bookkeeping is the Cluster's (shared with the simulator);
this file only performs actions and wires the parts together.

Faults (engine.config.FaultConfig): a step or pull that raises fails its requests and the instance goes on;
`max_faults` in a row, or one step or pull past its deadline (a hung thread cannot be stopped), take the
instance out of dispatch, its driver ends, and the others go on. With no instance of a role left, new
requests fail fast (EngineUnavailableError).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import replace
from typing import TypeVar

import torch

from engine.config import EngineConfig, SamplingParams
from engine.instance import GIL_SWITCH_INTERVAL_S, Worker, build_instances
from engine.loader import Checkpoint, load_checkpoint
from engine.request import Request
from engine.stop import StopRule
from scheduler.runtime.cluster import Cluster, Execute, Pull, Slot
from scheduler.runtime.policy import make_policy
from scheduler.runtime.trace import StepTrace
from serving.api import EngineUnavailableError, InstanceStats, QueueFullError, RequestOutput
from serving.outputs import OutputProcessor
from transfer.base import make_transfer

log = logging.getLogger("engine")
T = TypeVar("T")


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
        self.instances: list[Worker] = [(wrap or _same)(i) for i in build_instances(config, ckpt)]
        self.dtype = self.instances[0].pool.cache.dtype
        self.slots = [Slot(i.name, i.role, make_policy(i.role, config.scheduler, i.pool.allocator, self.rule,
                                                       config.chunked_prefill,
                                                       config.swap_space_bytes // i.pool.block_bytes),
                           i.pool.allocator) for i in self.instances]
        self._instance = {s.name: i for s, i in zip(self.slots, self.instances)}
        self.outputs = OutputProcessor(self.tokenizer, self.rule, config.max_stream_lag)
        self.step_trace = StepTrace(config.step_trace) if config.step_trace else None
        self.cluster = Cluster(self.slots, clock, self._wake, self.outputs, self.step_trace)
        self.transfers = {(p.name, d.name): make_transfer(config.transfer, p.spec, d.spec)
                          for p in self.instances if p.role == "prefill"
                          for d in self.instances if d.role == "decode"}
        self.wake: dict[str, asyncio.Event] = {}
        self.tasks: list[asyncio.Task] = []
        self._ids = itertools.count()
        self.closed = False

    # ---------------- public API ----------------
    async def start(self) -> None:
        """Start one driver task per instance on the running event loop."""
        self.wake = {s.name: asyncio.Event() for s in self.slots}
        self.tasks = [asyncio.create_task(self._drive(s), name=s.name) for s in self.slots]
        for t in self.tasks:
            t.add_done_callback(self._driver_ended)

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
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for slot, inst in zip(self.slots, self.instances):
            if slot.state == "hung":  # its thread may never return: do not wait for it
                threading.Thread(target=inst.close, name=f"close-{slot.name}", daemon=True).start()
            else:
                inst.close()
        for req in list(self.cluster.requests.values()):
            self.cluster.finish(req, "abort")

    @property
    def hung(self) -> list[str]:
        """Instances whose thread is stuck in a step or pull (a process holding one cannot exit cleanly)."""
        return [s.name for s in self.slots if s.state == "hung"]

    # ---------------- driving the instances ----------------
    def _wake(self, slot: Slot) -> None:
        ev = self.wake.get(slot.name)
        if ev is not None:
            ev.set()

    async def _drive(self, slot: Slot) -> None:
        inst = self._instance[slot.name]
        ev = self.wake[slot.name]
        faults = self.config.faults
        in_a_row = 0  # consecutive steps or pulls that raised
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
                    sampled = await _perform(inst.execute(action.step), faults.step_timeout, "step")
                    self.cluster.executed(slot, action.step, sampled)
                else:
                    for pull in action:
                        nbytes = await _perform(inst.call(self._copy, pull), faults.transfer_timeout, "KV pull")
                        self.cluster.pulled(pull, nbytes)
                in_a_row = 0
            except Fault as e:
                in_a_row += 1
                state = "hung" if e.hung else "failed" if in_a_row >= faults.max_faults else None
                self._fault(slot, str(e), state, e.__cause__)
                if state is not None:
                    return
            await asyncio.sleep(0)  # let the server's handlers run between steps

    def _fault(self, slot: Slot, what: str, state: str | None, exc: BaseException | None = None) -> None:
        """A step or pull of slot failed: end its requests; with state, take slot out of dispatch for good."""
        log.error("instance %s: %s%s", slot.name, what, f"; taken out of dispatch ({state})" if state else "",
                  exc_info=exc)
        for rid in slot.in_flight:
            self.outputs.explain(rid, f"instance {slot.name} failed: {what}")
        self.cluster.failed(slot, "error")
        if state is not None:
            self.cluster.retire(slot, state)
            down = self.cluster.unavailable()
            if down:
                log.error("engine unavailable: %s; new requests are refused", down)

    def _copy(self, pull: Pull) -> int:
        """On the decoder's thread: the prompt's blocks (the rest of dst_blocks is room for new tokens)."""
        src, dst = self._instance[pull.src.name], self._instance[pull.dst.name]
        stats = self.transfers[(src.name, dst.name)].pull(src.pool, pull.src_blocks, dst.pool,
                                                          pull.dst_blocks[:len(pull.src_blocks)])
        return stats.bytes

    def _driver_ended(self, task: asyncio.Task) -> None:
        """A driver must never die quietly: a bug outside the worker (in the scheduling code) takes its
        instance out of dispatch, as a fault would."""
        if task.cancelled() or task.exception() is None:
            return
        slot = next(s for s in self.slots if s.name == task.get_name())
        self._fault(slot, f"its loop crashed: {task.exception()!r}", "failed", task.exception())


class Fault(Exception):
    """A worker's step or pull raised (the cause), or outlived its deadline (hung)."""

    def __init__(self, message: str, hung: bool = False) -> None:
        super().__init__(message)
        self.hung = hung


async def _perform(work: Coroutine[object, object, T], seconds: float, what: str) -> T:
    """Await a worker's step or pull; Fault if it raises or is not done within `seconds` (0: no deadline).
    A hung thread cannot be stopped: past the deadline it is left to itself and its result is dropped."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds or None)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise Fault(f"{what} did not finish within {seconds:g} s", hung=True)
    try:
        return task.result()
    except Exception as e:
        raise Fault(f"{what} raised {e!r}") from e


def _same(worker: Worker) -> Worker:
    return worker
