"""The AsyncEngine: instances built from the layout, one coroutine loop per instance, one asyncio loop.

    add_request ──> least-loaded prefill instance ──(first token streamed)──> decode instance's
    migration queue ──pull KV (transfer/)──> continuous batching ──tokens──> the request's stream

Colocated modes run one loop per instance that both prefills and decodes (prefill-first, or
chunked). Policies (scheduler/) decide; instances (engine/instance.py) run forward passes on their
own threads; this file moves requests between them and is the only writer of request state.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from engine.config import EngineConfig, SamplingParams, parse_device
from engine.instance import Instance, Sampled
from engine.loader import Checkpoint, load_checkpoint
from engine.model import LlamaModel
from engine.precision import build_model, resolve_dtype  # noqa: F401 (resolve_dtype: re-exported)
from engine.request import Metrics, Request, Status
from engine.step_trace import StepTrace
from engine.stop import StopStringMatcher, check_stop
from scheduler.batch import Step
from scheduler.colocated import ColocatedScheduler
from scheduler.decode import DecodeScheduler
from scheduler.dispatch import least_loaded
from scheduler.prefill import PrefillScheduler
from transfer.base import make_transfer

log = logging.getLogger("engine")

# Instances are threads of one process. A thread returning from a torch op (GIL released) waits for
# the GIL until the thread holding it drops it, forced after the switch interval (CPython: 5 ms). A
# forward is hundreds of small ops, so two busy instances slowed each other ~2x (decode next to a
# prefill, measured by bench/simulator_fidelity.py's investigation); 0.2 ms cuts that to ~1.2x.
GIL_SWITCH_INTERVAL_S = 2e-4


class QueueFullError(RuntimeError):
    """The admission queue is full: retry later (the server answers 503 with Retry-After)."""


@dataclass
class RequestOutput:
    """One update of a request's stream; the last one has finished=True and the whole result."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every generated token so far
    text: str  # every released character so far
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[dict] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    metrics: Metrics | None = None


class _Track:
    """Engine-side state of a live request: its stream and its detokenizer."""

    def __init__(self, req: Request, stops: list[str], include_stop: bool) -> None:
        self.req = req
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.matcher = StopStringMatcher(stops, include_stop) if stops else None
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, checkpoint: Checkpoint | None = None) -> None:
        self.config = config = config or EngineConfig()
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        ckpt = checkpoint or load_checkpoint(config.model)
        self.model_name = ckpt.name
        self.model_config = ckpt.config
        self.tokenizer = ckpt.tokenizer
        self.eos_ids = frozenset(ckpt.config.eos_token_ids)
        self.max_model_len = ckpt.config.max_position_embeddings
        specs = ([("prefill", d) for d in config.prefill_devices] + [("decode", d) for d in config.decode_devices]
                 if config.mode == "disagg" else [("colocated", d) for d in config.devices])
        models: dict[str, LlamaModel] = {}  # one copy of the weights per physical device
        self.instances: list[Instance] = []
        for i, (role, dev) in enumerate(specs):
            kind, idx = parse_device(dev)
            key = "cpu" if kind == "cpu" else f"cuda:{idx}"
            if key not in models:
                device = torch.device(key)
                models[key] = build_model(ckpt, config.dtype, config.weights, device, config.compile)
            cache = config.decode_cache if role == "decode" and config.decode_cache else config.cache
            self.instances.append(Instance(f"{role}{i}", role, dev, models[key], cache))
        self.dtype = next(iter(models.values())).dtype
        sc = config.scheduler
        self.scheds: dict[str, object] = {}
        for inst in self.instances:
            alloc = inst.pool.allocator
            if inst.role == "prefill":
                self.scheds[inst.name] = PrefillScheduler(sc, alloc)
            elif inst.role == "decode":
                self.scheds[inst.name] = DecodeScheduler(sc, alloc)
            else:
                self.scheds[inst.name] = ColocatedScheduler(sc, alloc, chunked=config.chunked_prefill)
        self.entry = [i for i in self.instances if i.role in ("prefill", "colocated")]
        self.decoders = [i for i in self.instances if i.role == "decode"]
        self.transfers = {(p.name, d.name): make_transfer(config.transfer, p.spec, d.spec)
                          for p in self.entry for d in self.decoders}
        self.tracks: dict[str, _Track] = {}
        self.wake: dict[str, asyncio.Event] = {}
        self.tasks: list[asyncio.Task] = []
        self.transfer_log: list[tuple[str, int, float]] = []  # (request id, bytes, seconds)
        self.step_trace = StepTrace(config.step_trace) if config.step_trace else None
        self._ids = itertools.count()
        self.closed = False
        self.error: str | None = None

    # ---------------- public API ----------------
    async def start(self) -> None:
        """Start the instance loops on the running event loop."""
        self.wake = {i.name: asyncio.Event() for i in self.instances}
        loop_for = {"prefill": self._prefill_loop, "decode": self._decode_loop, "colocated": self._colocated_loop}
        self.tasks = [asyncio.create_task(loop_for[i.role](i), name=i.name) for i in self.instances]
        for t in self.tasks:
            t.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task) -> None:
        """An instance loop must never die quietly: log it, fail every live request, refuse new ones."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("instance loop %s crashed", task.get_name(), exc_info=task.exception())
        self.closed = True
        self.error = f"instance loop {task.get_name()} crashed: {task.exception()!r}"
        for track in list(self.tracks.values()):
            self._finish(track.req, "error")

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival: float | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request; returns the async iterator of its outputs. ValueError on bad input.

        Closing the iterator aborts the request; a caller that never iterates it must call abort().
        """
        if self.closed:
            raise RuntimeError(self.error or "engine is shut down")
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
        self.validate(ids, params)
        waiting = sum(self._num_waiting(i) for i in self.entry)
        if waiting >= self.config.scheduler.max_waiting:
            raise QueueFullError(f"admission queue full ({waiting} waiting)")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.tracks:
            raise ValueError(f"duplicate request id {request_id!r}")
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - len(ids)
        req = Request(request_id, ids, params, arrival)
        if params.seed is not None:
            req.generator = torch.Generator().manual_seed(params.seed)
        track = _Track(req, params.stop, params.include_stop_str_in_output)
        self.tracks[request_id] = track
        inst = least_loaded(self.entry, lambda i: self._sched(i).load)
        req.instance, req.pool = inst, inst.pool
        self._sched(inst).add(req)
        self.wake[inst.name].set()
        return self._stream(track)

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
        track = self.tracks.get(request_id)
        if track is None or track.req.finished:
            return
        req = track.req
        req.aborted = True
        if not any(req.id in i.busy for i in self.instances):
            self._finish(req, "abort")

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> RequestOutput:
        final = None
        async for out in self.add_request(prompt, params, request_id):
            final = out
        return final

    def stats(self) -> list[dict]:
        out = []
        for inst in self.instances:
            s = self._sched(inst)
            dec = s.decode if isinstance(s, ColocatedScheduler) else s
            pre = s.prefill if isinstance(s, ColocatedScheduler) else s
            out.append({
                "instance": inst.name, "role": inst.role, "device": inst.spec,
                "kv_blocks_used": inst.pool.allocator.num_used, "kv_blocks_total": inst.pool.num_blocks,
                "running": len(getattr(dec, "running", [])),
                "waiting": len(getattr(pre, "waiting", [])) + len(getattr(dec, "migrating", []))
                + len(getattr(dec, "swapped", [])),
            })
        return out

    def check(self) -> None:
        """Integrity of every pool (tests call this after each scenario)."""
        for inst in self.instances:
            inst.pool.check()

    async def shutdown(self) -> None:
        self.closed = True
        for track in list(self.tracks.values()):
            track.req.aborted = True
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for inst in self.instances:
            inst.close()
        for track in list(self.tracks.values()):
            self._finish(track.req, "abort")

    # ---------------- loops ----------------
    def _sched(self, inst: Instance):
        return self.scheds[inst.name]

    def _num_waiting(self, inst: Instance) -> int:
        s = self._sched(inst)
        return len(s.prefill.waiting if isinstance(s, ColocatedScheduler) else s.waiting)

    async def _run(self, inst: Instance, step: Step) -> list[Sampled]:
        reqs = step.requests + [r for r, _ in step.swap_out] + step.swap_in
        now = time.perf_counter()
        if self.step_trace is not None:
            self.step_trace.begin(inst.name, inst.role, step, now, any(i.busy for i in self.instances if i is not inst))
        inst.busy.update(r.id for r in reqs)
        for r, _ in step.items:
            if r.metrics.prefill_start is None:
                r.metrics.prefill_start = now
            elif r.metrics.decode_start is None and r.num_computed >= r.num_prompt:
                r.metrics.decode_start = now
        try:
            return await asyncio.get_running_loop().run_in_executor(inst.executor, inst.run, step)
        finally:
            inst.busy.difference_update(r.id for r in reqs)

    async def _idle(self, inst: Instance) -> None:
        ev = self.wake[inst.name]
        await ev.wait()
        ev.clear()
        for _ in range(3):  # a burst of arrivals (e.g. over HTTP) lands in one batch, not two
            await asyncio.sleep(0)

    def _sweep_aborted(self, reqs: list[Request]) -> None:
        for r in reqs:
            if r.aborted and not r.finished:
                self._finish(r, "abort")

    async def _colocated_loop(self, inst: Instance) -> None:
        sched: ColocatedScheduler = self._sched(inst)
        while True:
            step = sched.schedule() if sched.has_work else Step()
            if not step:
                await self._idle(inst)
                continue
            results = await self._run(inst, step)
            for req, n in step.items:
                req.num_computed += n
                if req.status is Status.PREFILLING and req.num_computed >= req.num_prompt:
                    req.metrics.prefill_end = time.perf_counter()
                    sched.finished_prompt(req)
            self._emit_all(results)
            self._sweep_aborted(step.requests)
            await asyncio.sleep(0)  # let the server's handlers run between steps
            self._step_ended(inst)

    async def _prefill_loop(self, inst: Instance) -> None:
        sched: PrefillScheduler = self._sched(inst)
        while True:
            step = sched.schedule()
            if not step:
                await self._idle(inst)
                continue
            results = await self._run(inst, step)
            now = time.perf_counter()
            for req, n in step.items:
                req.num_computed += n
                req.metrics.prefill_end = now
            self._emit_all(results)
            for req in step.requests:
                if req.aborted and not req.finished:
                    self._finish(req, "abort")
                elif not req.finished:  # hand off: the decode side pulls the KV when it has room
                    dec = least_loaded(self.decoders, lambda d: self._sched(d).load)
                    req.instance = dec
                    self._sched(dec).add(req)
                    self.wake[dec.name].set()
            await asyncio.sleep(0)
            self._step_ended(inst)

    async def _decode_loop(self, inst: Instance) -> None:
        sched: DecodeScheduler = self._sched(inst)
        while True:
            pulled = sched.admit()
            for req, blocks in pulled:
                await self._pull(inst, req, blocks)
            step = sched.schedule()
            if not step:
                if not pulled:
                    await self._idle(inst)
                continue
            results = await self._run(inst, step)
            for req, n in step.items:
                req.num_computed += n
            self._emit_all(results)
            self._sweep_aborted(step.requests)
            await asyncio.sleep(0)
            self._step_ended(inst)

    def _step_ended(self, inst: Instance) -> None:
        if self.step_trace is not None:
            self.step_trace.end(inst.name, time.perf_counter())

    async def _pull(self, inst: Instance, req: Request, blocks: list[int]) -> None:
        src_inst, src_blocks = req.pool, req.block_table
        prefill = next(i for i in self.entry if i.pool is src_inst)
        xfer = self.transfers[(prefill.name, inst.name)]
        req.metrics.transfer_start = time.perf_counter()
        inst.busy.add(req.id)
        try:
            # the prompt's blocks; the rest of `blocks` is room for the tokens decode will add
            stats = await asyncio.get_running_loop().run_in_executor(
                inst.executor, xfer.pull, src_inst, src_blocks, inst.pool, blocks[:len(src_blocks)])
        finally:
            inst.busy.discard(req.id)
        req.metrics.transfer_end = time.perf_counter()
        req.metrics.transfer_bytes = stats.bytes
        self.transfer_log.append((req.id, stats.bytes, stats.seconds))
        src_inst.allocator.free(src_blocks)  # the prefill side frees only after the pull
        req.block_table, req.pool, req.status = blocks, inst.pool, Status.DECODING
        self.wake[prefill.name].set()  # its pool has room again
        if req.aborted:
            self._finish(req, "abort")

    # ---------------- outputs ----------------
    def _emit_all(self, results: list[Sampled]) -> None:
        for s in results:
            if not s.req.finished:
                self._emit(s)

    def _emit(self, s: Sampled) -> None:
        req, track = s.req, self.tracks[s.req.id]
        now = time.perf_counter()
        req.output_ids.append(s.token)
        req.metrics.token_times.append(now)
        if s.logprobs is not None:
            req.logprobs.append(s.logprobs)
        reason = check_stop(req, self.eos_ids, self.max_model_len)
        delta = self._detokenize(track, reason is not None and s.token in self._stop_ids(req))
        if track.matcher is not None:
            delta, matched = track.matcher.feed(delta)
            if matched:
                reason = "stop"
            elif reason is not None:
                delta += track.matcher.flush()
        track.text += delta
        out = RequestOutput(req.id, req.prompt_ids, list(req.output_ids), track.text, [s.token], delta,
                            [s.logprobs] if s.logprobs is not None else [])
        if reason is not None:
            self._finish(req, reason, out)
        else:
            track.queue.put_nowait(out)

    def _stop_ids(self, req: Request) -> set[int]:
        ids = set(req.params.stop_token_ids)
        if not req.params.ignore_eos:
            ids |= self.eos_ids
        return ids

    def _detokenize(self, track: _Track, hide_last: bool) -> str:
        """Text delta of the newest token; a stop token (EOS) itself is not shown, as in vLLM."""
        ids = track.req.output_ids[:-1] if hide_last else track.req.output_ids
        if len(ids) <= track.read_offset:
            return ""
        delta, track.prefix_offset, track.read_offset = self.tokenizer.decode_incremental(
            ids, track.prefix_offset, track.read_offset)
        return delta

    def _finish(self, req: Request, reason: str, out: RequestOutput | None = None) -> None:
        if req.finished:
            return
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.metrics.finish = time.perf_counter()
        for inst in self.instances:
            self._sched(inst).remove(req)
        if req.block_table and req.pool is not None:
            req.pool.allocator.free(req.block_table)
        req.swapped = None
        track = self.tracks.pop(req.id, None)
        if track is None:
            return
        out = out or RequestOutput(req.id, req.prompt_ids, list(req.output_ids), track.text)
        out.finished, out.finish_reason, out.metrics = True, reason, req.metrics
        track.queue.put_nowait(out)
        if req.instance is not None:
            self.wake[req.instance.name].set()

    async def _stream(self, track: _Track) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                out = await track.queue.get()
                yield out
                if out.finished:
                    return
        finally:  # the consumer went away (client disconnect): abort
            if not track.req.finished:
                self.abort(track.req.id)
