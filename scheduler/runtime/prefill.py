"""Prefill policy: FCFS batches bounded by tokens and sequences, admission by free blocks.

A prefill instance keeps each request's blocks until a decode instance has pulled them, so a full
pool stops admission: backpressure, nothing dropped. After its step a prompt is handed off
(HandOff event) unless its first token already finished it.
"""
from __future__ import annotations

from collections import deque

from engine.config import SchedulerConfig
from engine.kv_cache import BlockAllocator
from engine.request import Request, Status
from engine.step import Sampled, Step
from engine.stop import StopRule
from scheduler.runtime.lifecycle import Event, HandOff, advance, finishing


class PrefillScheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator, rule: StopRule) -> None:
        self.config = config
        self.allocator = allocator
        self.rule = rule
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in the step being computed now

    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def remove(self, req: Request) -> bool:
        """Drop a queued or running request (abort, finish). True if it was here."""
        for queue in (self.waiting, self.running):
            if req in queue:
                queue.remove(req)
                return True
        return False

    @property
    def load(self) -> int:
        """Tokens queued: what least-loaded dispatch compares."""
        return sum(r.num_prompt for r in self.waiting)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting)

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
            self.running.append(req)
            step.items.append((req, n))
            tokens += n
        return step

    def schedule_chunks(self, budget: int, max_seqs: int) -> Step:
        """Chunked prefill: fill `budget` tokens with prompt chunks, FCFS; a partly prefilled prompt
        stays at the head of the queue (status PREFILLING) and continues next step (a pipeline: the next
        step after the one its last chunk is in has reported back)."""
        step = Step()
        for req in list(self.waiting):
            if budget <= 0 or len(step.items) >= max_seqs:
                break
            if req.in_flight:
                continue
            n = min(budget, req.num_uncomputed)
            if not self.allocator.append(req.id, req.block_table, req.num_computed + n):
                break
            req.status = Status.PREFILLING
            step.items.append((req, n))
            budget -= n
        return step

    def complete(self, step: Step, sampled: list[Sampled], now: float) -> list[Event]:
        """Every prompt of the step is done: hand it off, unless its first token finished it."""
        events = advance(step, sampled, now, self.rule)
        done = finishing(events)
        for req, _ in step.items:
            req.metrics.prefill_end = now
            if req in self.running:
                self.running.remove(req)
            if req.id not in done:
                req.status = Status.MIGRATING
                events.append(HandOff(req))
        return events
