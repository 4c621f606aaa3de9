"""Faults on demand: a Worker wrapper that makes chosen steps or calls (KV pulls run as calls on the decode
instance) raise or hang, on the instance's own thread, as a broken device or a stalled transfer would.

    engine = AsyncEngine(config, ckpt, wrap=FaultyWorker)
    engine.instances[0].arm("step", "raise")       # its next step raises
    engine.instances[2].arm("call", "hang", 2)     # its next two calls block until close()
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal, TypeVar

from engine.instance import Worker
from engine.kv_cache import KVPool
from engine.step import Sampled, Step

T = TypeVar("T")
On = Literal["step", "call"]
Kind = Literal["raise", "hang"]


class InjectedFault(RuntimeError):
    pass


def _raise(what: str) -> None:
    raise InjectedFault(f"injected fault in a {what}")


class FaultyWorker:
    """A Worker (engine.instance.Worker) that behaves as `inner` until armed."""

    def __init__(self, inner: Worker) -> None:
        self.inner = inner
        self.name, self.role, self.spec = inner.name, inner.role, inner.spec
        self.pool: KVPool = inner.pool
        self.armed: dict[On, list[Kind]] = {"step": [], "call": []}
        self.released = threading.Event()  # hung calls return once set (close() sets it)
        self.injected = 0

    def arm(self, on: On, kind: Kind, times: int = 1) -> None:
        """The next `times` steps (or calls) raise, or block the instance's thread until close()."""
        self.armed[on] += [kind] * times

    async def execute(self, step: Step) -> list[Sampled]:
        if self.armed["step"]:
            return await self._fault(self.armed["step"].pop(0), "step")
        return await self.inner.execute(step)

    async def call(self, fn: Callable[..., T], *args) -> T:
        if self.armed["call"]:
            return await self._fault(self.armed["call"].pop(0), "call")
        return await self.inner.call(fn, *args)

    async def _fault(self, kind: Kind, what: str):
        self.injected += 1
        if kind == "raise":
            return await self.inner.call(_raise, what)
        return await self.inner.call(self.released.wait)

    def close(self) -> None:
        self.released.set()
        self.inner.close()
