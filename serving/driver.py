"""One driver task per instance: it performs what the Cluster decides, on the instance's worker, and handles
what goes wrong there.

    action = cluster.next_action(slot)          # scheduler/runtime: what to run, or None (sleep until woken)
    Execute(step) -> worker.execute on its pinned thread (or its Ray actor) ──> cluster.executed(...)
    Pull(...)     -> workers.pull: the KV copy, in order with the decode instance's steps ──> cluster.pulled(...)

Faults (engine.config.FaultConfig): a step or pull that raises fails its requests and the instance goes on;
`max_faults` in a row, or one step or pull past its deadline (a hung thread cannot be stopped), take the
instance out of dispatch, its driver ends, and the others go on. A worker whose process dies (a Ray actor)
leaves dispatch as "dead" and rejoins if Ray restarts it. With no instance of a role left, the Cluster says
so (Cluster.unavailable) and the engine refuses new requests.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import TypeVar

from engine.config import FaultConfig
from engine.instance import Worker, WorkerDied
from scheduler.runtime.cluster import Cluster, Execute, Slot
from serving.outputs import OutputProcessor
from serving.workers import Workers

log = logging.getLogger("engine")
T = TypeVar("T")


class Drivers:
    """The driver tasks of every slot of `cluster`, on the running event loop."""

    def __init__(self, cluster: Cluster, workers: Workers, outputs: OutputProcessor, faults: FaultConfig) -> None:
        self.cluster, self.workers, self.outputs, self.faults = cluster, workers, outputs, faults
        self.slots = cluster.slots
        self.worker: dict[str, Worker] = {s.name: w for s, w in zip(self.slots, workers.instances)}
        self.wake: dict[str, asyncio.Event] = {}
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.wake = {s.name: asyncio.Event() for s in self.slots}
        self.tasks = [self._start(s) for s in self.slots]
        self.workers.watch(self._died, self._back)

    def notify(self, slot: Slot) -> None:
        """The Cluster's wake-up call: slot may have something to do."""
        ev = self.wake.get(slot.name)
        if ev is not None:
            ev.set()

    async def stop(self) -> None:
        """Cancel the drivers and close every worker (a hung one from a thread of its own: it may never return)."""
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for slot in self.slots:
            worker = self.worker[slot.name]
            if slot.state == "hung":
                threading.Thread(target=worker.close, name=f"close-{slot.name}", daemon=True).start()
            else:
                worker.close()
        self.workers.close()

    def _start(self, slot: Slot) -> asyncio.Task:
        task = asyncio.create_task(self._drive(slot), name=slot.name)
        task.add_done_callback(self._ended)
        return task

    async def _drive(self, slot: Slot) -> None:
        worker, ev, faults = self.worker[slot.name], self.wake[slot.name], self.faults
        in_a_row = 0  # consecutive steps or pulls that raised
        while True:
            action = self.cluster.next_action(slot)
            if action is None:
                await ev.wait()
                ev.clear()
                for _ in range(3):  # a burst of arrivals (e.g. over HTTP) lands in one batch, not two
                    await asyncio.sleep(0)
                continue
            try:
                if isinstance(action, Execute):
                    sampled = await _perform(worker.execute(action.step), faults.step_timeout, "step")
                    self.cluster.executed(slot, action.step, sampled)
                else:
                    for pull in action:
                        nbytes = await _perform(self.workers.pull(pull), faults.transfer_timeout, "KV pull")
                        self.cluster.pulled(pull, nbytes)
                in_a_row = 0
            except Fault as e:
                if isinstance(e.__cause__, WorkerDied):  # this worker's process, or the one a pull read from
                    self._died(e.__cause__.worker, str(e.__cause__))
                    if e.__cause__.worker == slot.name:
                        return
                    self.fault(slot, str(e), None)
                    continue
                in_a_row += 1
                state = "hung" if e.hung else "failed" if in_a_row >= faults.max_faults else None
                self.fault(slot, str(e), state, e.__cause__)
                if state is not None:
                    return
            await asyncio.sleep(0)  # let the server's handlers run between steps

    def fault(self, slot: Slot, what: str, state: str | None, exc: BaseException | None = None) -> None:
        """A step or pull of slot failed: end its requests (their blocks freed on both sides); with state, take
        slot out of dispatch."""
        log.error("instance %s: %s%s", slot.name, what, f"; taken out of dispatch ({state})" if state else "",
                  exc_info=exc)
        for rid in slot.in_flight:
            self.outputs.explain(rid, f"instance {slot.name} failed: {what}")
        self.cluster.failed(slot, "error")
        if state is not None:
            self.cluster.retire(slot, state)
            down = self.cluster.unavailable()
            if down:
                log.error("engine unavailable: %s; new requests are refused", down)

    def _died(self, name: str, why: str) -> None:
        """A worker's process is gone: it leaves dispatch ("dead") as a failed instance does."""
        i, slot = next((i, s) for i, s in enumerate(self.slots) if s.name == name)
        if slot.state != "ok":
            return
        self.fault(slot, why, "dead")
        if self.tasks[i] is not asyncio.current_task():
            self.tasks[i].cancel()

    def _back(self, name: str) -> None:
        """A dead worker was restarted (its pool empty, as retire left its allocator): back into dispatch."""
        i, slot = next((i, s) for i, s in enumerate(self.slots) if s.name == name)
        self.cluster.restore(slot)
        self.tasks[i] = self._start(slot)

    def _ended(self, task: asyncio.Task) -> None:
        """A driver must never die quietly: a bug outside the worker (in the scheduling code) takes its
        instance out of dispatch, as a fault would."""
        if task.cancelled() or task.exception() is None:
            return
        slot = next(s for s in self.slots if s.name == task.get_name())
        self.fault(slot, f"its loop crashed: {task.exception()!r}", "failed", task.exception())


class Fault(Exception):
    """A worker's step or pull raised (the cause), or outlived its deadline (hung)."""

    def __init__(self, message: str, hung: bool = False) -> None:
        super().__init__(message)
        self.hung = hung


async def _perform(work: Coroutine[object, object, T], seconds: float, what: str) -> T:
    """Await a worker's step or pull; Fault if it raises or is not done within `seconds` (0: no deadline).
    A hung thread cannot be stopped: past the deadline it is left to itself and its result is dropped.
    (A deadline on the awaiting task itself, not a task per step to wait on: one event-loop hop less per step.)"""
    deadline = asyncio.timeout(seconds or None)
    try:
        async with deadline:
            return await work
    except Exception as e:
        if deadline.expired():
            raise Fault(f"{what} did not finish within {seconds:g} s", hung=True) from None
        raise Fault(f"{what} raised {e!r}") from e
