"""The offline API, shaped like vLLM's: a thin synchronous wrapper over the AsyncEngine.

    llm = LLM()                                   # default model, colocated on all cores
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].text); llm.close()

The engine's event loop runs on a background thread (uvloop), so generate() works from plain code.
"""
from __future__ import annotations

import asyncio
import threading

from engine.args import EngineArgs
from engine.config import SamplingParams
from engine.loader import Checkpoint
from serving.api import RequestOutput
from serving.engine import AsyncEngine


class LLM:
    """LLM(model=None, **engine_args): every keyword is a field of engine.args.EngineArgs (the server's flags
    without dashes), e.g. LLM(mode="disagg", max_num_seqs=32, dtype="float32")."""

    def __init__(self, model: str | None = None, *, checkpoint: Checkpoint | None = None, **engine_args) -> None:
        self.config = EngineArgs(model=model, **engine_args).engine_config()
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
            streams = [self.engine.add_request(p, sp) for p, sp in zip(prompts, plist)]
            return list(await asyncio.gather(*(_last(s) for s in streams)))

        return self._call(run_all())

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([self.tokenizer.encode_chat(messages)], params)[0]

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
