"""Decode policy: continuous batching, admission by free blocks, preemption of the newest by swapping.

Requests join from the migration queue (KV still in a prefill pool) or from the swapped list
(KV in host memory); swapped requests resume before new admissions. When the running batch would
overflow the pool, the newest decoding request is swapped out; it keeps its tokens and resumes
later bit-exactly.
"""
from __future__ import annotations

from collections import deque

from engine.config import SchedulerConfig
from engine.kv_cache import BlockAllocator
from engine.request import Request, Status
from scheduler.batch import Step


class DecodeScheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.migrating: deque[Request] = deque()  # prefilled elsewhere, waiting to be pulled
        self.swapped: deque[Request] = deque()  # preempted, KV on the host
        self.running: list[Request] = []  # DECODING, or MIGRATING while its pull is in flight

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
                return True
        return False

    @property
    def load(self) -> int:
        return len(self.running) + len(self.migrating) + len(self.swapped)

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
            return pulled  # resuming swapped requests comes first
        while self.migrating and self._fits(self.migrating[0]):
            req = self.migrating.popleft()
            pulled.append((req, self.allocator.allocate(req.id, self.allocator.blocks_for(req.num_tokens))))
            self.running.append(req)
        return pulled

    def _preempt_newest(self, step: Step) -> Request | None:
        for i in range(len(self.running) - 1, -1, -1):
            victim = self.running[i]
            if victim.status is not Status.DECODING:
                continue  # a pull in flight is never preempted
            del self.running[i]
            if victim in step.swap_in:  # swapped in this very step: its KV is still on the host
                step.swap_in.remove(victim)
            else:
                step.swap_out.append((victim, list(victim.block_table)))
            self.allocator.free(victim.block_table)
            victim.status = Status.PREEMPTED
            victim.metrics.preemptions += 1
            self.swapped.appendleft(victim)
            return victim
        return None

    def schedule(self) -> Step:
        """One decode step over the running batch, swapping in or out as memory allows."""
        step = Step()
        while self.swapped and self._fits(self.swapped[0]):
            req = self.swapped.popleft()
            req.block_table = self.allocator.allocate(req.id, self.allocator.blocks_for(req.num_tokens))
            req.status = Status.DECODING
            self.running.append(req)
            step.swap_in.append(req)
        i = 0
        while i < len(self.running):
            req = self.running[i]
            if req.status is not Status.DECODING or self.allocator.append(req.id, req.block_table, req.num_tokens):
                i += 1
                continue
            if self._preempt_newest(step) is None:
                raise RuntimeError("decode pool cannot hold a single request; validate lengths at admission")
            if req in self.running:  # the victim was another request, maybe one before req
                i = self.running.index(req)
        step.items = [(r, r.num_uncomputed) for r in self.running if r.status is Status.DECODING]
        return step
