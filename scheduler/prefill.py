"""Prefill policy: FCFS batches bounded by tokens and sequences, admission by free blocks.

A prefill instance keeps each request's blocks until a decode instance has pulled them, so a full
pool stops admission: backpressure, nothing dropped.
"""
from __future__ import annotations

from collections import deque

from engine.config import SchedulerConfig
from engine.kv_cache import BlockAllocator
from engine.request import Request, Status
from scheduler.batch import Step


class PrefillScheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Request] = deque()

    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def remove(self, req: Request) -> bool:
        """Drop a queued request (abort). True if it was queued here."""
        try:
            self.waiting.remove(req)
            return True
        except ValueError:
            return False

    @property
    def load(self) -> int:
        """Tokens queued: what least-loaded dispatch compares."""
        return sum(r.num_prompt for r in self.waiting)

    def schedule(self, max_seqs: int | None = None) -> Step:
        """Take waiting requests in order while the batch limits and the pool allow; allocate their blocks."""
        step = Step()
        tokens = 0
        cfg = self.config
        limit = cfg.max_prefill_seqs if max_seqs is None else min(max_seqs, cfg.max_prefill_seqs)
        while self.waiting and len(step.items) < limit:
            req = self.waiting[0]
            n = req.num_uncomputed
            if step.items and tokens + n > cfg.max_prefill_tokens:
                break
            need = self.allocator.blocks_for(req.num_tokens)
            if not self.allocator.can_allocate(need):
                break  # FCFS: never let a short prompt overtake one that waits for space
            self.waiting.popleft()
            req.block_table = self.allocator.allocate(req.id, need)
            req.status = Status.PREFILLING
            step.items.append((req, n))
            tokens += n
        return step

    def schedule_chunks(self, budget: int, max_seqs: int) -> Step:
        """Chunked prefill: fill `budget` tokens with prompt chunks, FCFS; a partly prefilled prompt
        stays at the head of the queue (status PREFILLING) and continues next step."""
        step = Step()
        for req in list(self.waiting):
            if budget <= 0 or len(step.items) >= max_seqs:
                break
            n = min(budget, req.num_uncomputed)
            if not self.allocator.append(req.id, req.block_table, req.num_computed + n):
                break
            req.status = Status.PREFILLING
            step.items.append((req, n))
            budget -= n
        return step

    def pop_done(self, req: Request) -> None:
        """A prompt whose last chunk ran leaves the queue."""
        self.waiting.remove(req)
