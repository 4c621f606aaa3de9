"""The instances as the scheduler sees them, and everything that happens to a request between steps.

Sans-IO: the Cluster never runs a forward pass or a copy and never waits. A driver asks
`next_action(slot)`, performs what it gets (Execute a step, or Pull KV blocks), and reports back with
`executed(...)` / `pulled(...)`. The engine (serving/engine.py) performs actions on the instances'
threads under the wall clock; the simulator (scheduler/planner/simulator.py) prices them with a latency
model on a virtual clock. Both therefore share every decision and every piece of request bookkeeping:

    add ──> least-loaded entry slot ──next_action──> Execute(step) ──executed──> policy.complete ──> events
    events: Token -> sink (stream it; a stop string may finish it) | HandOff -> least-loaded decode slot
            | Finished -> finish (free blocks, tell the sink)
    decode slot ──next_action──> Pull (its admit() allotted blocks) ──pulled──> the prefill side frees its copy

A request inside a step or a pull (`slot.in_flight`, `req.in_flight`) is never finished under the driver's
feet: an abort marks it, and the Cluster finishes it when the step or pull reports back. Nor is it
scheduled again before then: an instance of pp pipeline stages (`slot.depth`) may have up to pp steps in
flight (a new batch enters stage 1 while the previous one is in stage 2), and each step's requests sit
out of the others. With depth 1 (every instance the engine runs) a slot takes one action at a time.

Faults: a step or pull that raised or hung ends its requests (`failed`); an instance taken out of
dispatch (`retire`) hands its queued requests that hold no KV there to another instance of its role and
ends the rest with "error". If no instance of a role is left, every request ends and `unavailable` says why.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from engine.kv_cache import BlockAllocator
from engine.request import Request, Status
from engine.step import Sampled, Step
from scheduler.runtime.decode import DecodeScheduler
from scheduler.runtime.dispatch import least_loaded
from scheduler.runtime.lifecycle import Event, Finished, HandOff, Policy, Token
from scheduler.runtime.policy import QueueCounts, Role, queue_counts
from scheduler.runtime.trace import StepTrace


@dataclass(eq=False)
class Slot:
    """One instance: its policy and block allocator. What executes its steps is the driver's business."""

    name: str
    role: Role
    policy: Policy
    allocator: BlockAllocator
    busy: bool = False  # inside a step or a pull
    in_flight: set[str] = field(default_factory=set)  # ids of the requests in those steps and pulls
    depth: int = 1  # steps it may have in flight at once: its pipeline stages (pp)
    steps: int = 0  # steps in flight now
    state: str = "ok"  # ok | failed | hung: anything but ok is out of dispatch for good
    faults: int = 0  # steps and pulls that raised or hung here


@dataclass(frozen=True)
class Execute:
    step: Step


@dataclass(frozen=True)
class Pull:
    """Copy req's prompt KV from src_blocks of src's pool into dst_blocks of dst's pool (the rest of
    dst_blocks is room for the tokens decode adds). src None: the KV comes from outside the cluster
    (the simulator's decode-only phase)."""

    req: Request
    src: Slot | None
    dst: Slot
    src_blocks: list[int]
    dst_blocks: list[int]


Action = Execute | list[Pull]


class Sink(Protocol):
    """Where tokens and endings go: the engine's output processor, or the simulator's recorder."""

    def on_token(self, event: Token) -> str | None:
        """A token was appended to event.req. Returns a finish reason found on the output side (a stop
        string), or None."""
        ...

    def on_finish(self, req: Request, reason: str) -> None: ...


class Cluster:
    def __init__(self, slots: list[Slot], clock: Callable[[], float], wake: Callable[[Slot], None], sink: Sink,
                 trace: StepTrace | None = None) -> None:
        self.slots = slots
        self.entry = [s for s in slots if s.role in ("prefill", "colocated")]  # live ones: dispatch targets
        self.decoders = [s for s in slots if s.role == "decode"]
        self.roles = {s.role for s in slots}
        self.clock, self.wake, self.sink, self.trace = clock, wake, sink, trace
        self.requests: dict[str, Request] = {}  # live requests by id
        self.pending: dict[str, Pull] = {}  # pulls in flight: their destination blocks are held here

    # ---------------- requests in and out ----------------
    def add(self, req: Request, slot: Slot | None = None) -> None:
        """A new request goes to the least-loaded entry slot (prefill or colocated), or to `slot`."""
        if req.id in self.requests:
            raise ValueError(f"duplicate request id {req.id!r}")
        self.requests[req.id] = req
        if self.trace is not None:
            self.trace.arrived()
        self._dispatch(req, slot)

    def add_prefilled(self, req: Request) -> None:
        """A request whose prompt KV exists outside the cluster (decode-only simulation): decoders pull it."""
        self.requests[req.id] = req
        req.kv_home = None
        self._hand_off(req)

    def abort(self, request_id: str) -> None:
        """Cancel in any phase; every block the request holds is freed now, or when its step or pull ends."""
        req = self.requests.get(request_id)
        if req is not None:
            self.end(req, "abort")

    def end(self, req: Request, reason: str) -> None:
        """Finish req with `reason` now, or, inside a step or pull, when that reports back."""
        if req.finished or req.aborted:
            return
        req.aborted = reason
        if not any(req.id in s.in_flight for s in self.slots):
            self.finish(req, reason)

    def finish(self, req: Request, reason: str) -> None:
        """The one way a request ends: out of every queue, every block freed, the sink told."""
        if req.finished:
            return
        req.status, req.finish_reason = Status.FINISHED, reason
        req.metrics.finish = self.clock()
        for slot in self.slots:
            if slot.policy.remove(req):
                self.wake(slot)
        if req.block_table and req.kv_home is not None:
            req.kv_home.allocator.free(req.block_table)
        pull = self.pending.pop(req.id, None)
        if pull is not None:  # blocks allotted for a pull that will not land
            pull.dst.allocator.free(pull.dst_blocks)
        req.swapped = None
        del self.requests[req.id]
        self.sink.on_finish(req, reason)

    # ---------------- the step lifecycle ----------------
    def ready(self, slot: Slot) -> bool:
        """May the driver ask `slot` for another action now: nothing in flight, or (a pipeline) fewer than
        `depth` steps and no pull."""
        return not slot.busy or (0 < slot.steps < slot.depth and not any(p.dst is slot for p in self.pending.values()))

    def next_action(self, slot: Slot) -> Action | None:
        """What `slot` should do now (None: nothing; wait to be woken); call it when `ready(slot)`. Marks
        the slot busy and the action's requests in flight."""
        if isinstance(slot.policy, DecodeScheduler):
            admitted = slot.policy.admit()
            if admitted:
                now = self.clock()
                pulls = [Pull(r, r.kv_home, slot, list(r.block_table), blocks) for r, blocks in admitted]
                for p in pulls:
                    p.req.metrics.transfer_start = now
                    self.pending[p.req.id] = p
                self._enter(slot, [p.req for p in pulls], step=False)
                return pulls
        step = slot.policy.schedule()
        if not step:
            return None
        now = self.clock()
        for r, _ in step.items:
            if r.metrics.prefill_start is None:
                r.metrics.prefill_start = now
            elif r.metrics.decode_start is None and r.num_computed >= r.num_prompt:
                r.metrics.decode_start = now
        if self.trace is not None:
            self.trace.begin(slot.name, slot.role, step, now, any(s.busy for s in self.slots if s is not slot))
        self._enter(slot, _inside(step), step=True)
        return Execute(step)

    def executed(self, slot: Slot, step: Step, sampled: list[Sampled]) -> None:
        """The step ran: apply its events, then end whatever was aborted meanwhile."""
        events = slot.policy.complete(step, sampled, self.clock())
        self._leave(slot, _inside(step), step=True)
        self._apply(events)
        for req in _inside(step):
            if req.aborted and not req.finished:
                self.finish(req, req.aborted)
        if self.trace is not None:
            self.trace.end(slot.name, self.clock())

    def pulled(self, pull: Pull, nbytes: int) -> None:
        """One pull landed: the request's KV now lives here; the prefill side frees its copy."""
        req = pull.req
        self.pending.pop(req.id, None)
        req.metrics.transfer_end = self.clock()
        req.metrics.transfer_bytes = nbytes
        if pull.src is not None:
            pull.src.allocator.free(req.block_table)
            self.wake(pull.src)  # its pool has room again: backpressure released
        slot = pull.dst
        req.block_table, req.kv_home, req.status = pull.dst_blocks, slot, Status.DECODING
        self._leave(slot, [req], step=False)
        if req.aborted:
            self.finish(req, req.aborted)

    def failed(self, slot: Slot, reason: str) -> list[Request]:
        """The slot's step or pull raised (or hung): its in-flight requests end with `reason`, their blocks
        freed on both sides. Returns them."""
        reqs = [self.requests[i] for i in slot.in_flight if i in self.requests]
        self._leave(slot)
        slot.faults += 1
        for req in reqs:
            self.finish(req, req.aborted or reason)  # an abort that came meanwhile stays an abort
        return reqs

    def retire(self, slot: Slot, state: str = "failed") -> list[Request]:
        """Take slot out of dispatch for good (its driver has stopped; call `failed` first for its step).
        Requests queued there that hold no KV there go to another instance of its role; the others end
        with "error" (when their step elsewhere reports back, if inside one). If that was the last
        instance of its role, every request ends. Returns the requests ended or marked to end."""
        slot.state = state
        for live in (self.entry, self.decoders):
            if slot in live:
                live.remove(slot)
        lost = self.unavailable() is not None
        doomed = []
        for req in list(self.requests.values()):
            queued = slot.policy.remove(req)
            if not lost and queued and req.kv_home is not slot:  # migrating here, KV still on its prefill side
                self._hand_off(req)
            elif not lost and queued and req.status is Status.WAITING and not req.block_table:
                self._dispatch(req)  # not started: another entry instance takes it
            elif lost or queued or req.kv_home is slot:
                doomed.append(req)
                self.end(req, "error")
        return doomed

    def restore(self, slot: Slot) -> None:
        """A retired slot's worker was restarted (its pool empty, as retire left its allocator): back in dispatch."""
        slot.state, slot.faults = "ok", 0
        live = self.decoders if slot.role == "decode" else self.entry
        if slot not in live:
            live.append(slot)
        self.wake(slot)

    def unavailable(self) -> str | None:
        """Why no request can be served any more (an instance role with none left in dispatch), or None."""
        for role, live in (("prefill", self.entry), ("colocated", self.entry), ("decode", self.decoders)):
            if role in self.roles and not live:
                return f"no {role} instance left in dispatch"
        return None

    # ---------------- views ----------------
    def counts(self, slot: Slot) -> QueueCounts:
        return queue_counts(slot.policy)

    def queued(self) -> tuple[int, int]:
        """Requests admitted and not decoding yet (queued for or in prefill, or waiting for a decode slot), and
        their prompt tokens: what the admission bounds count."""
        reqs = [r for r in self.requests.values() if r.status in (Status.WAITING, Status.PREFILLING, Status.MIGRATING)]
        return len(reqs), sum(r.num_prompt for r in reqs)

    def check(self) -> None:
        """Allocator invariants of every slot (tests call it after each scenario)."""
        for slot in self.slots:
            slot.allocator.check()

    # ---------------- internals ----------------
    def _enter(self, slot: Slot, reqs: list[Request], step: bool) -> None:
        slot.busy = True
        slot.steps += step
        for r in reqs:
            r.in_flight = True
            slot.in_flight.add(r.id)

    def _leave(self, slot: Slot, reqs: list[Request] | None = None, step: bool = False) -> None:
        """reqs are out of their step (step=True) or pull; None: everything in flight on the slot."""
        if reqs is None:
            reqs = [self.requests[i] for i in slot.in_flight if i in self.requests]
            slot.in_flight.clear()
            slot.steps = 0
        slot.steps -= step
        for r in reqs:
            r.in_flight = False
            slot.in_flight.discard(r.id)
        slot.busy = bool(slot.in_flight) or slot.steps > 0

    def _apply(self, events: list[Event]) -> None:
        for ev in events:
            req = ev.req
            if req.finished:
                continue
            if isinstance(ev, Token):
                reason = self.sink.on_token(ev)
                if reason is not None:
                    self.finish(req, reason)
            elif isinstance(ev, Finished):
                self.finish(req, ev.reason)
            elif isinstance(ev, HandOff):
                if req.aborted:
                    self.finish(req, req.aborted)
                else:
                    self._hand_off(req)

    def _dispatch(self, req: Request, slot: Slot | None = None) -> None:
        slot = slot or least_loaded(self.entry, lambda s: s.policy.load)
        req.kv_home = slot
        slot.policy.add(req)
        self.wake(slot)

    def _hand_off(self, req: Request) -> None:
        if not self.decoders:  # a prefill-only layout (the simulator's phase search): the KV leaves at once
            self.finish(req, "error" if "decode" in self.roles else "prefilled")
            return
        dec = least_loaded(self.decoders, lambda s: s.policy.load)
        dec.policy.add(req)
        self.wake(dec)


def _inside(step: Step) -> list[Request]:
    """Every request a step touches: those it computes and those whose KV it swaps."""
    return step.requests + [r for r, _ in step.swap_out] + step.swap_in
