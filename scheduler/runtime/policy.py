"""Which policy an instance of each role runs, and what its queues hold (for /metrics and the dashboard)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.config import SchedulerConfig
from engine.kv_cache import BlockAllocator
from engine.request import Status
from engine.stop import StopRule
from scheduler.runtime.colocated import ColocatedScheduler
from scheduler.runtime.decode import DecodeScheduler
from scheduler.runtime.lifecycle import Policy
from scheduler.runtime.prefill import PrefillScheduler

Role = Literal["prefill", "decode", "colocated"]


@dataclass(frozen=True)
class QueueCounts:
    """Requests by where they are on one instance (what /metrics and the dashboard show)."""

    waiting: int = 0  # queued for prefill
    prefilling: int = 0  # in a prefill step now (prefill-first and disagg; chunked: partly prefilled)
    migrating: int = 0  # prefilled elsewhere, waiting for their KV to be pulled here
    running: int = 0  # decoding (or being pulled in)
    swapped: int = 0  # preempted, waiting to resume


def make_policy(role: Role, config: SchedulerConfig, allocator: BlockAllocator, rule: StopRule,
                chunked: bool = False, swap_blocks: int | None = None) -> Policy:
    if role == "prefill":
        return PrefillScheduler(config, allocator, rule)
    if role == "decode":
        return DecodeScheduler(config, allocator, rule, swap_blocks)
    return ColocatedScheduler(config, allocator, rule, chunked, swap_blocks)


def queue_counts(policy: Policy) -> QueueCounts:
    pre = policy.prefill if isinstance(policy, ColocatedScheduler) else policy
    dec = policy.decode if isinstance(policy, ColocatedScheduler) else policy
    prefilling = 0
    waiting = 0
    if isinstance(pre, PrefillScheduler):
        partial = sum(r.status is Status.PREFILLING for r in pre.waiting)  # chunked: started prompts
        waiting, prefilling = len(pre.waiting) - partial, len(pre.running) + partial
    if isinstance(dec, DecodeScheduler):
        return QueueCounts(waiting, prefilling, len(dec.migrating), len(dec.running), len(dec.swapped))
    return QueueCounts(waiting, prefilling)
