"""One instance in its own process: the body of a Ray actor (serving/ray_cluster.py builds and drives it).

It holds what an in-process Instance holds (the model, the KV pool, the sampler) and runs the same code
(engine/instance.py: forward, save_blocks, load_blocks) on the WireSteps it is sent. It keeps only what a
Step cannot carry cheaply: host copies of swapped-out KV and the seeded requests' generators, forgotten when
the driver lists them in `drop`. Its pool is shared with same-node peers (transfer/shared.py); a peer on
another node reads blocks with `read_blocks`, which runs on its own thread ("io") so that a pull never waits
behind a step.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings

import torch

from engine.config import CacheConfig, parse_device
from engine.instance import Instance
from engine.kv_cache import KVPool
from engine.loader import load_checkpoint
from engine.omp import off_main_thread
from engine.precision import build_model
from engine.step import WireResult, WireStep
from transfer.shared import PoolHandle, SharedPool, open_pool
from transfer.torch_copy import TorchTransfer

log = logging.getLogger("engine.ray")


class InstanceActor:
    def __init__(self, name: str, role: str, device: str, model: str | None, dtype: str, cache: CacheConfig,
                 weights: str = "auto", compile: bool = False) -> None:
        import ray  # lazy: this module is imported wherever the engine is, but runs only inside an actor

        _normal_priority()
        kind, _ = parse_device(device)
        if kind == "cuda":  # every GPU is visible (IPC needs one numbering): take the one Ray assigned
            device = f"cuda:{int(ray.get_gpu_ids()[0])}"
        self.node_id = ray.get_runtime_context().get_node_id()
        ckpt = load_checkpoint(model)
        torch_device = torch.device(device if kind == "cuda" else "cpu")
        self.model_config = ckpt.config
        self.shared = SharedPool(name, torch_device)
        self.inst = off_main_thread(lambda: Instance(  # engine/omp.py: no OpenMP pool left on this thread
            name, role, device, build_model(ckpt, dtype, weights, torch_device, compile), cache,
            allocate=self.shared.allocate))
        ckpt = None  # the model holds what it needs
        self.inst.executor.shutdown()  # steps run on the actor's own thread, pinned on first use
        self.transfer = TorchTransfer()
        self.swapped: dict[str, torch.Tensor] = {}  # request id -> host copy of its KV
        self.generators: dict[str, torch.Generator] = {}  # seeded request id -> its generator, as advanced here
        self.peers: dict[str, KVPool] = {}  # same-node prefill pools, mapped
        self.remote: dict[str, tuple] = {}  # prefill instances on other nodes: (actor handle, pool dtype)
        self.pinned: set[int] = set()

    def info(self) -> dict:
        """What the driver needs: where it runs, its pool's shape and how a same-node peer maps it."""
        pool = self.inst.pool
        return {"node_id": self.node_id, "pid": os.getpid(), "model_config": self.model_config,
                "num_blocks": pool.num_blocks, "block_shape": pool.block_shape, "dtype": pool.dtype,
                "handle": self.shared.handle()}

    # ---------------- peers ----------------
    def attach(self, src: str, handle: PoolHandle) -> None:
        """Map a same-node instance's pool: pulls from it are one copy."""
        self.peers[src] = open_pool(handle, self.inst.pool.block_size, src)
        self.remote.pop(src, None)

    def link(self, src: str, actor, dtype: torch.dtype) -> None:
        """An instance on another node (its pool in `dtype`): pulls from it travel as Ray objects."""
        self.remote[src] = (actor, dtype)
        self.peers.pop(src, None)

    # ---------------- the instance's work, in order ----------------
    def execute(self, wire: WireStep) -> WireResult:
        self._pin()
        return self.inst.on_device(self._execute, wire)

    @torch.inference_mode()
    def _execute(self, wire: WireStep) -> WireResult:
        for rid in wire.drop:
            self.swapped.pop(rid, None)
            self.generators.pop(rid, None)
        for rid, blocks in wire.swap_out:
            self.swapped[rid] = self.inst.save_blocks(blocks)
        for rid, table in wire.swap_in:
            self.inst.load_blocks(self.swapped.pop(rid), table)
        batch = wire.batch
        if not batch.ids:
            return WireResult([])
        for row in batch.samplers:
            if row.generator_state is not None:  # first seen here: continue where the last worker left it
                self.generators[row.id] = torch.Generator().set_state(row.generator_state)
            row.generator = self.generators.get(row.id)
        tokens, logprobs = self.inst.forward(batch)
        for row in batch.samplers:  # a seeded row without a generator got one from its seed just now
            if row.generator is not None:
                self.generators[row.id] = row.generator
        gens = ({r.id: r.generator.get_state() for r in batch.samplers if r.generator is not None}
                if wire.return_generators else {})
        return WireResult([(r.id, t, lp) for r, t, lp in zip(batch.samplers, tokens, logprobs)], gens)

    def pull(self, src: str, src_blocks: list[int], dst_blocks: list[int]) -> int:
        """Copy src's blocks into ours: from its mapped pool (same node), or as a Ray object (another node)."""
        self._pin()
        pool = self.inst.pool
        peer = self.peers.get(src)
        if peer is None:
            import ray

            actor, dtype = self.remote[src]
            data = ray.get(actor.read_blocks.remote(src_blocks))  # read-only, in the object store
            with warnings.catch_warnings():  # only read: torch would warn that it cannot write to it
                warnings.simplefilter("ignore", UserWarning)
                buf = torch.from_numpy(data).view(dtype)
            peer, src_blocks = KVPool.over(buf, pool.block_size, src), list(range(len(src_blocks)))
        return self.inst.on_device(self.transfer.pull, peer, src_blocks, pool, dst_blocks).bytes

    def call(self, fn, *args):
        """Worker.call: fn(*args) in this process, in order with the steps."""
        self._pin()
        return fn(*args)

    # ---------------- the "io" thread: never behind a step ----------------
    def read_blocks(self, blocks: list[int]):
        """These blocks as one contiguous host array (bytes; numpy so that Ray ships it without pickling)."""
        cache = self.inst.pool.cache
        out = cache[torch.tensor(blocks, device=cache.device)].cpu()  # [n, layers, 2, block_size, kvh, hd]
        return out.view(torch.uint8).numpy()

    def ping(self) -> int:
        return os.getpid()

    def _pin(self) -> None:
        tid = threading.get_native_id()
        if tid not in self.pinned:
            self.inst.pin_thread()
            _normal_priority()
            self.pinned.add(tid)


def _normal_priority() -> None:
    """Ray starts worker processes at nice 15: an instance would then lose its cores to any other process (the
    in-process threads run at the server's priority). Back to the nice of 0, for every thread there is now
    (Linux keeps one per thread) and, through inheritance, those started later."""
    try:
        for tid in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), 0)
    except (OSError, PermissionError) as e:  # lowering nice needs CAP_SYS_NICE or a RLIMIT_NICE that allows it
        log.warning("instance actor stays at nice %d (%s): it yields its cores to other processes",
                    os.getpriority(os.PRIO_PROCESS, 0), e)
