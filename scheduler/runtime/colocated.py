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
from engine.request import Request, Status
from engine.step import Sampled, Step
from engine.stop import StopRule
from scheduler.runtime.decode import DecodeScheduler
from scheduler.runtime.lifecycle import Event, advance, finishing
from scheduler.runtime.prefill import PrefillScheduler


class ColocatedScheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator, rule: StopRule, chunked: bool = False,
                 swap_blocks: int | None = None) -> None:
        self.config = config
        self.chunked = chunked
        self.rule = rule
        self.prefill = PrefillScheduler(config, allocator, rule)
        self.decode = DecodeScheduler(config, allocator, rule, swap_blocks)

    def add(self, req: Request) -> None:
        self.prefill.add(req)

    def remove(self, req: Request) -> bool:
        return self.prefill.remove(req) or self.decode.remove(req)

    @property
    def load(self) -> int:
        return self.prefill.load + self.decode.load

    @property
    def has_work(self) -> bool:
        return self.prefill.has_work or self.decode.has_work

    def schedule(self) -> Step:
        if not self.has_work:
            return Step()
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

    def complete(self, step: Step, sampled: list[Sampled], now: float) -> list[Event]:
        """A prompt whose last token ran decodes from the next step, unless its first token finished it."""
        prompts = [r for r, _ in step.items if r.status is Status.PREFILLING]
        events = advance(step, sampled, now, self.rule)
        done = finishing(events)
        for req in prompts:
            if req.num_computed < req.num_prompt:
                continue  # a chunk that is not the prompt's last
            req.metrics.prefill_end = now
            self.prefill.remove(req)  # chunked: leaves the queue's head; prefill-first: leaves `running`
            if req.id not in done:
                self.decode.add_running(req)
        return events
