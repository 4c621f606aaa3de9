"""The workers of a layout for the chosen cluster kind, and the KV hand-off between them.

    workers = build_workers(config, ckpt)    # .instances: one Worker per instance (engine/instance.py)
    nbytes = await workers.pull(pull)        # a scheduler.runtime.cluster.Pull, performed on its decode side

local (the default): threads of this process (engine.instance.Instance), hand-offs by transfer/ between
pools in this address space. ray: Ray actors on any node (serving/ray_cluster.py, imported only then).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from engine.config import EngineConfig
from engine.instance import Worker, build_instances
from engine.loader import Checkpoint
from scheduler.runtime.cluster import Pull
from transfer.base import make_transfer

Wrap = Callable[[Worker], Worker]


class Workers(Protocol):
    instances: list[Worker]

    async def pull(self, pull: Pull) -> int:
        """Copy the pull's prompt blocks into its decode instance's pool, in order with that instance's steps;
        returns the bytes moved."""
        ...

    def watch(self, on_death: Callable[[str, str], None], on_back: Callable[[str], None]) -> None:
        """Call on_death(instance, why) if a worker's process dies between calls, on_back(instance) if it is
        restarted; on the running event loop."""
        ...

    def close(self) -> None:
        """Release what the instances share (after each instance's close)."""
        ...


class LocalWorkers:
    """Threads of this process; they live and die with it."""

    def __init__(self, config: EngineConfig, ckpt: Checkpoint, wrap: Wrap | None = None) -> None:
        self.instances: list[Worker] = [(wrap or _same)(i) for i in build_instances(config, ckpt)]
        self.by_name = {i.name: i for i in self.instances}
        self.transfers = {(p.name, d.name): make_transfer(config.transfer, p.spec, d.spec)
                          for p in self.instances if p.role == "prefill"
                          for d in self.instances if d.role == "decode"}

    async def pull(self, pull: Pull) -> int:
        return await self.by_name[pull.dst.name].call(self._copy, pull)

    def _copy(self, pull: Pull) -> int:
        """On the decoder's thread: the prompt's blocks (the rest of dst_blocks is room for new tokens)."""
        src, dst = self.by_name[pull.src.name], self.by_name[pull.dst.name]
        stats = self.transfers[(src.name, dst.name)].pull(src.pool, pull.src_blocks, dst.pool,
                                                          pull.dst_blocks[:len(pull.src_blocks)])
        return stats.bytes

    def watch(self, on_death: Callable[[str, str], None], on_back: Callable[[str], None]) -> None:
        pass

    def close(self) -> None:
        pass


def _same(worker: Worker) -> Worker:
    return worker


def build_workers(config: EngineConfig, ckpt: Checkpoint, wrap: Wrap | None = None) -> Workers:
    """wrap: applied to each worker (tests inject faults with it)."""
    if config.cluster == "ray":
        try:
            import ray  # noqa: F401

            from serving.ray_cluster import RayCluster
        except ImportError as e:
            raise RuntimeError(f"--cluster ray needs the ray package (pip install ray): {e}") from None
        workers = RayCluster(config, ckpt)
        workers.instances = [(wrap or _same)(i) for i in workers.instances]
        return workers
    return LocalWorkers(config, ckpt, wrap)
