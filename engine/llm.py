"""The offline API, shaped like vLLM's: a thin synchronous wrapper over the AsyncEngine.

    llm = LLM()                                   # default model, colocated on all cores
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].text); llm.close()

The engine's event loop runs on a background thread (uvloop), so generate() works from plain code.
"""
from __future__ import annotations

import asyncio
import os
import threading

from engine.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from engine.engine import AsyncEngine, RequestOutput
from engine.loader import Checkpoint


def default_disagg_devices() -> tuple[list[str], list[str]]:
    """Half the cores prefill, half decode: 'cpu:0' / 'cpu:1' on a 2-core machine."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return ["cpu"], ["cpu"]
    half = len(cores) // 2
    fmt = lambda cs: "cpu:" + ",".join(map(str, cs))  # noqa: E731
    return [fmt(cores[:half])], [fmt(cores[half:])]


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", weights: str = "auto", mode: str = "colocated",
                 chunked_prefill: bool = False, devices: list[str] | None = None,
                 prefill_devices: list[str] | None = None, decode_devices: list[str] | None = None,
                 kv_cache_memory: int | str = "512MiB", num_kv_blocks: int | None = None,
                 decode_kv_blocks: int | None = None, block_size: int = 16,
                 max_num_seqs: int = 64, max_prefill_tokens: int = 4096, chunk_budget: int = 512,
                 transfer: str = "auto", checkpoint: Checkpoint | None = None, compile: bool = False) -> None:
        if mode == "disagg" and not (prefill_devices and decode_devices):
            p, d = default_disagg_devices()
            prefill_devices, decode_devices = prefill_devices or p, decode_devices or d
        self.config = EngineConfig(
            model=model, dtype=dtype, weights=weights, compile=compile, mode=mode, chunked_prefill=chunked_prefill,
            devices=devices or ["cpu"],
            prefill_devices=prefill_devices or [], decode_devices=decode_devices or [], transfer=transfer,
            cache=CacheConfig(block_size=block_size, memory_bytes=kv_cache_memory, num_blocks=num_kv_blocks),
            decode_cache=CacheConfig(block_size=block_size, memory_bytes=kv_cache_memory, num_blocks=decode_kv_blocks)
            if decode_kv_blocks else None,
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens,
                                      chunk_budget=chunk_budget))
        self.engine = AsyncEngine(self.config, checkpoint)
        self.tokenizer = self.engine.tokenizer
        self._loop = _new_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llm-loop", daemon=True)
        self._thread.start()
        self._call(self.engine.start())

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompts: str | list[int] | list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """One final output per prompt, in order. A prompt is a string or a list of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")

        async def run_all() -> list[RequestOutput]:
            # copy params: the engine fills in defaults (max_tokens=None) per request
            streams = [self.engine.add_request(p, _copy(sp)) for p, sp in zip(prompts, plist)]
            return list(await asyncio.gather(*(_last(s) for s in streams)))

        return self._call(run_all())

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate([prompt], params)[0]

    def check(self) -> None:
        self.engine.check()

    def close(self) -> None:
        if self._thread.is_alive():
            self._call(self.engine.shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _copy(p: SamplingParams) -> SamplingParams:
    from dataclasses import replace
    return replace(p, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids))


async def _last(stream) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    return last


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()
