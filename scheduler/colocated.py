"""Colocated baselines: one pool and one instance run both phases.

- prefill-first (vLLM's default): a step is either a prefill batch, when new prompts fit, or a
  decode step over the running batch.
- chunked (Sarathi-Serve, vLLM chunked prefill): every step spends a token budget, first one token
  per running decode, then chunks of waiting prompts in order.
Both reuse the prefill and decode policies over the same allocator.
"""
from __future__ import annotations

from engine.config import SchedulerConfig
from engine.kv_cache import BlockAllocator
from engine.request import Request
from scheduler.batch import Step
from scheduler.decode import DecodeScheduler
from scheduler.prefill import PrefillScheduler


class ColocatedScheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator, chunked: bool = False) -> None:
        self.config = config
        self.chunked = chunked
        self.prefill = PrefillScheduler(config, allocator)
        self.decode = DecodeScheduler(config, allocator)

    def add(self, req: Request) -> None:
        self.prefill.add(req)

    def remove(self, req: Request) -> bool:
        return self.prefill.remove(req) or self.decode.remove(req)

    @property
    def load(self) -> int:
        return self.prefill.load + self.decode.load

    @property
    def has_work(self) -> bool:
        return bool(self.prefill.waiting or self.decode.running or self.decode.swapped)

    def schedule(self) -> Step:
        if self.chunked:
            step = self.decode.schedule()
            room = self.config.max_num_seqs - len(self.decode.running)
            chunks = self.prefill.schedule_chunks(self.config.chunk_budget - step.num_tokens, max(room, 0))
            step.items += chunks.items
            return step
        if not self.decode.swapped:
            room = self.config.max_num_seqs - len(self.decode.running)
            if room > 0:
                step = self.prefill.schedule(max_seqs=room)
                if step:
                    return step
        return self.decode.schedule()

    def finished_prompt(self, req: Request) -> None:
        """Called after a step in which req's last prompt token ran: it decodes from now on."""
        if self.chunked:
            self.prefill.pop_done(req)
        self.decode.add_running(req)
