"""Decode policy: continuous batching, admission by free blocks, preemption of the newest.

Requests join from the migration queue (KV still in a prefill pool) or from the swapped list;
preempted requests resume before new admissions. When the running batch would overflow the pool,
the newest decoding request is preempted: swapped to host memory while the swap space allows
(it resumes bit-exactly by copying its KV back), else its KV is dropped and recomputed on resume
(one prefill-like chunk over its prompt and outputs; its tokens so far are kept).
"""
from __future__ import annotations

from collections import deque

from engine.config import SchedulerConfig
from engine.kv_cache import BlockAllocator
from engine.request import Request, Status
from engine.step import Sampled, Step
from engine.stop import StopRule
from scheduler.runtime.lifecycle import Event, advance


class DecodeScheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator, rule: StopRule,
                 swap_blocks: int | None = None) -> None:
        """swap_blocks: host memory for swapped-out KV, in blocks (None: unbounded)."""
        self.config = config
        self.allocator = allocator
        self.rule = rule
        self.swap_blocks = swap_blocks
        self.migrating: deque[Request] = deque()  # prefilled elsewhere, waiting to be pulled
        self.swapped: deque[Request] = deque()  # preempted: KV on the host, or dropped (recompute)
        self.running: list[Request] = []  # DECODING, or MIGRATING while its pull is in flight
        self.on_host: dict[str, int] = {}  # request id -> blocks of KV it holds in host memory

    def add(self, req: Request) -> None:
        """A request whose prefill has finished and whose KV sits in another pool."""
        req.status = Status.MIGRATING
        self.migrating.append(req)

    def add_running(self, req: Request) -> None:
        """A request prefilled in this same pool (colocated modes): it decodes from the next step."""
        req.status = Status.DECODING
        self.running.append(req)

    def remove(self, req: Request) -> bool:
        for queue in (self.migrating, self.swapped, self.running):
            if req in queue:
                queue.remove(req)
                self.on_host.pop(req.id, None)
                return True
        return False

    @property
    def load(self) -> int:
        return len(self.running) + len(self.migrating) + len(self.swapped)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.swapped)

    @property
    def host_blocks_used(self) -> int:
        return sum(self.on_host.values())

    def _fits(self, req: Request) -> bool:
        # room for its KV and the token the next step computes
        return (len(self.running) < self.config.max_num_seqs
                and self.allocator.can_allocate(self.allocator.blocks_for(req.num_tokens)))

    def admit(self) -> list[tuple[Request, list[int]]]:
        """Migrating requests to pull now, in order, each with the blocks allocated for it here.

        They join `running` at once (holding their new blocks); the caller copies their KV in,
        frees the source blocks, then marks them DECODING.
        """
        pulled: list[tuple[Request, list[int]]] = []
        if self.swapped:
            return pulled  # resuming preempted requests comes first
        while self.migrating and self._fits(self.migrating[0]):
            req = self.migrating.popleft()
            pulled.append((req, self.allocator.allocate(req.id, self.allocator.blocks_for(req.num_tokens))))
            self.running.append(req)
        return pulled

    def _preempt_newest(self, step: Step) -> Request | None:
        for i in range(len(self.running) - 1, -1, -1):
            victim = self.running[i]
            if victim.status is not Status.DECODING or victim.in_flight:
                continue  # a pull or a step in flight is never preempted
            del self.running[i]
            blocks = list(victim.block_table)
            if victim in step.swap_in:  # swapped in this very step: its KV is still on the host
                step.swap_in.remove(victim)
                self.on_host[victim.id] = len(blocks)
            elif victim.num_computed and (self.swap_blocks is None
                                          or self.host_blocks_used + len(blocks) <= self.swap_blocks):
                step.swap_out.append((victim, blocks))
                self.on_host[victim.id] = len(blocks)
            else:  # no host room: drop its KV; it is recomputed when it resumes
                victim.num_computed = 0
            self.allocator.free(victim.block_table)
            victim.status = Status.PREEMPTED
            victim.metrics.preemptions += 1
            self.swapped.appendleft(victim)
            return victim
        return None

    def schedule(self) -> Step:
        """One decode step over the running batch, resuming or preempting as memory allows. Requests inside
        a step still in flight (an earlier stage of a pipeline) sit this one out."""
        step = Step()
        while self.swapped and not self.swapped[0].in_flight and self._fits(self.swapped[0]):
            req = self.swapped.popleft()
            req.block_table = self.allocator.allocate(req.id, self.allocator.blocks_for(req.num_tokens))
            req.status = Status.DECODING
            self.running.append(req)
            if self.on_host.pop(req.id, None) is not None:
                step.swap_in.append(req)
        i = 0
        while i < len(self.running):
            req = self.running[i]
            if (req.status is not Status.DECODING or req.in_flight
                    or self.allocator.append(req.id, req.block_table, req.num_tokens)):
                i += 1
                continue
            if self._preempt_newest(step) is None:
                raise RuntimeError("decode pool cannot hold a single request; validate lengths at admission")
            if req in self.running:  # the victim was another request, maybe one before req
                i = self.running.index(req)
        step.items = [(r, r.num_uncomputed) for r in self.running if r.status is Status.DECODING and not r.in_flight]
        return step

    def complete(self, step: Step, sampled: list[Sampled], now: float) -> list[Event]:
        return advance(step, sampled, now, self.rule)
