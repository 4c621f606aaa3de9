"""An asyncio event loop on a virtual clock, and an executor whose jobs take priced virtual time.

The loop never sleeps: when nothing is ready it jumps its clock to the next timer. A job submitted to a
VirtualExecutor runs at once (on the loop's thread) and its result is delivered `price(fn, args)` virtual
seconds later, so a driver that awaits run_in_executor sees the job take exactly that long.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
from collections.abc import Callable


class _InstantSelector(selectors.BaseSelector):
    def __init__(self) -> None:
        self.loop: VirtualLoop | None = None
        self._map: dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj, events, data=None):
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = self._map[fd] = selectors.SelectorKey(fileobj, fd, events, data)
        return key

    def unregister(self, fileobj):
        return self._map.pop(fileobj if isinstance(fileobj, int) else fileobj.fileno())

    def select(self, timeout=None):
        if timeout is None:
            raise RuntimeError("virtual loop: nothing scheduled and nothing ready (deadlock)")
        self.loop.now += timeout
        return []

    def get_map(self):
        return self._map

    def close(self) -> None:
        self._map.clear()


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        sel = _InstantSelector()
        super().__init__(sel)
        sel.loop = self
        self.now = 0.0

    def time(self) -> float:
        return self.now


class VirtualExecutor(concurrent.futures.Executor):
    def __init__(self, loop: VirtualLoop, price: Callable[[Callable, tuple], float]) -> None:
        self.loop, self.price = loop, price

    def submit(self, fn, /, *args, **kwargs):
        fut: concurrent.futures.Future = concurrent.futures.Future()
        seconds = self.price(fn, args)
        result = fn(*args, **kwargs)
        self.loop.call_later(seconds, fut.set_result, result)
        return fut

    def shutdown(self, wait=True, *, cancel_futures=False) -> None:
        pass
