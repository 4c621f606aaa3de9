"""--cluster ray: every instance a Ray actor (its own process, on any node of a Ray cluster), driven through
the same Worker interface as the in-process threads. The front end, the asyncio loop, the policies and the
block allocators stay in this process; an actor holds the model and the KV pool (serving/ray_actor.py).

Placement: the instances of one node of the layout (devices named "nodeK/..."; none named: node 0) form one
placement group with STRICT_PACK, as DistServe places a pipeline's stages: Ray puts the group on a single
machine with a bundle per instance ({"CPU": its cores} or {"GPU": 1, "CPU": 1}), so hand-offs the plan keeps
inside a node stay inside one.

Steps go as WireSteps (engine/step.py: packed tokens, positions, block tables, per sampled row its params
and, the first time a process sees a seeded request, its generator's state; a prefill actor sends the state
back so the decode side continues the same stream of random numbers). KV hand-off, pull-based as in process
(the decode side's admission and the prefill side's backpressure are the Cluster's, unchanged): the decode
actor copies from the prefill actor's pool mapped in shared memory when both are on one node
(transfer/shared.py: one copy), and receives the blocks as a Ray object from another node.

Faults: an actor that dies fails what it was running (WorkerDied), and a watcher that pings every actor
notices one that dies while idle; the engine then ends its requests, frees their KV on the other side and
takes it out of dispatch. With ray_max_restarts, Ray restarts it: once it answers again its peers map its new
pool and it rejoins dispatch, empty.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import EngineConfig, parse_device, split_node
from engine.instance import WorkerDied, layout
from engine.kv_cache import KVPool
from engine.loader import Checkpoint
from engine.request import Request
from engine.step import Sampled, SampleRow, Step, WireStep, pack
from scheduler.runtime.cluster import Pull
from serving.ray_actor import InstanceActor

log = logging.getLogger("engine.ray")
ROOT = str(Path(__file__).resolve().parents[1])  # actors import this checkout, not another installed copy
PING_S = 1.0  # how often the watcher pings each actor
PLACE_TIMEOUT_S = 60.0  # for Ray to find each layout node a machine with its bundles
START_TIMEOUT_S = 600.0  # for every actor to load the model
CLOSE_TIMEOUT_S = 15.0


def bundles(devices: list[str]) -> list[dict[str, float]]:
    """One node's bundles, one per instance: its cores (a whole node's, "cpu": one CPU), or its GPU; instances
    that name the same GPU share it (1/k of it each, so Ray gives them one device, as in process)."""
    kinds = [parse_device(d) for d in devices]
    out = []
    for kind, idx in kinds:
        if kind == "cuda":
            out.append({"CPU": 1.0, "GPU": 1.0 / kinds.count((kind, idx))})
        else:
            out.append({"CPU": float(len(idx) if isinstance(idx, list) else 1)})
    return out


class RayWorker:
    """A Worker whose instance is a Ray actor. `pool` is the allocator's view: its tensor is a meta tensor here
    (shape and dtype only), the real one lives in the actor."""

    def __init__(self, name: str, role: str, spec: str, actor, info: dict, block_size: int) -> None:
        self.name, self.role, self.spec, self.actor = name, role, spec, actor
        meta = torch.empty((info["num_blocks"], *info["block_shape"]), dtype=info["dtype"], device="meta")
        self.pool = KVPool.over(meta, block_size, name)
        self.reset(info)

    def reset(self, info: dict) -> None:
        """A (re)started actor: where it runs, and it knows no request yet."""
        self.node_id, self.pid, self.handle = info["node_id"], info["pid"], info["handle"]
        self.known: dict[str, Request] = {}  # requests whose generator or swapped KV the actor holds

    async def execute(self, step: Step) -> list[Sampled]:
        wire, reqs = self._wire(step)
        result = await remote(self.name, self.actor.execute, wire)
        for req, _ in step.swap_out:
            req.swapped = self.name  # its KV waits in the actor's host memory
        for req in step.swap_in:
            req.swapped = None
        for rid, state in result.generators.items():
            reqs[rid].generator.set_state(state)
        return [Sampled(reqs[rid], token, lp) for rid, token, lp in result.sampled]

    def _wire(self, step: Step) -> tuple[WireStep, dict[str, Request]]:
        drop = [rid for rid, r in self.known.items() if r.finished or getattr(r.kv_home, "name", None) != self.name]
        for rid in drop:
            del self.known[rid]
        batch = pack(step)
        reqs = {r.id: r for r in batch.samplers}
        batch.samplers = [SampleRow.of(r, send_generator=r.id not in self.known) for r in batch.samplers]
        self.known.update({r.id: r for r in reqs.values() if r.generator is not None})
        self.known.update({r.id: r for r, _ in step.swap_out})
        wire = WireStep(batch, [(r.id, blocks) for r, blocks in step.swap_out],
                        [(r.id, list(r.block_table)) for r in step.swap_in], drop,
                        return_generators=self.role == "prefill")  # its requests move on to a decode actor
        return wire, reqs

    async def call(self, fn, *args):
        return await remote(self.name, self.actor.call, fn, *args)

    def close(self) -> None:
        """Nothing here: RayCluster.close ends every actor at once, bounded in time."""


async def remote(name: str, method, *args, source: str | None = None):
    """Await an actor call. WorkerDied when the actor (`name`) is gone, or when the actor `source` it was
    reading from is; any other error is the call's own (the step's fault)."""
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return await method.remote(*args)
    except RayTaskError as e:  # raised inside the actor, e.g. by a peer that died under a pull
        if source is not None and isinstance(e.cause, RayActorError):
            raise WorkerDied(source, str(e.cause).splitlines()[0]) from e
        raise
    except RayActorError as e:
        raise WorkerDied(name, str(e).splitlines()[0]) from e


class RayCluster:
    """The workers of a layout as Ray actors, the KV hand-off between them, and their watcher."""

    def __init__(self, config: EngineConfig, ckpt: Checkpoint) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.config = config
        self.watchers: list[asyncio.Task] = []
        self.groups: dict = {}
        self.actors: list = []
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            ray.init(address=config.ray_address, include_dashboard=False, logging_level=logging.WARNING)
        self.node_id = ray.get_runtime_context().get_node_id()  # this process's node
        plan = layout(config)
        nodes: dict[int, list[int]] = {}  # node of the layout -> its instances
        for i, (_, _, dev, _) in enumerate(plan):
            nodes.setdefault(split_node(dev)[0] or 0, []).append(i)
        need = {n: bundles([split_node(plan[i][2])[1] for i in members]) for n, members in nodes.items()}
        self.groups = {n: placement_group(need[n], strategy="STRICT_PACK", name=f"distserve-node{n}-{os.getpid()}")
                       for n in nodes}
        try:
            ray.get([g.ready() for g in self.groups.values()], timeout=PLACE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise RuntimeError(f"Ray could not place the layout's nodes {need} (one machine each, STRICT_PACK) "
                               f"within {PLACE_TIMEOUT_S:g} s: see `ray status` for what the cluster has") from None
        started = []
        for n, members in nodes.items():
            for bundle, i in enumerate(members):
                name, role, dev, cache = plan[i]
                started.append((i, self._start(name, role, split_node(dev)[1], cache, self.groups[n], bundle,
                                               need[n][bundle])))
        self.actors = [a for _, a in sorted(started, key=lambda x: x[0])]
        try:
            infos = ray.get([a.info.remote() for a in self.actors], timeout=START_TIMEOUT_S)
        except Exception:  # an actor failed to start (its error says why) or took too long
            self.close()
            raise
        for (name, _, _, _), info in zip(plan, infos):
            if info["model_config"] != ckpt.config:
                self.close()
                model = config.model or "the default model"
                raise ValueError(f"instance {name} loaded another model than this process ({model}): under "
                                 "--cluster ray every node loads --model from its own path")
        self.instances = [RayWorker(name, role, dev, a, info, cache.block_size)
                          for (name, role, dev, cache), a, info in zip(plan, self.actors, infos)]
        self.by_name = {w.name: w for w in self.instances}
        self._connect(self.instances)

    def _start(self, name: str, role: str, device: str, cache, group, bundle: int, res: dict[str, float]):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        env = {"PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}  # CUDA IPC needs one GPU numbering
        cls = ray.remote(concurrency_groups={"io": 1})(InstanceActor)
        dtype, weights = self.config.precision(role)
        return cls.options(
            name=f"distserve-{name}-{os.getpid()}", num_cpus=res["CPU"], num_gpus=res.get("GPU", 0),
            max_restarts=self.config.ray_max_restarts, runtime_env={"env_vars": env},
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle),
        ).remote(name, role, device, self.config.model, dtype, cache, weights, self.config.compile)

    def _connect(self, changed: list[RayWorker]) -> None:
        """Decode actors map the pools of same-node prefill actors and link to the others."""
        import ray

        prefill = [w for w in self.instances if w.role == "prefill"]
        decode = [w for w in self.instances if w.role == "decode"]
        calls = []
        for d in decode:
            for p in prefill:
                if d in changed or p in changed:
                    calls.append(d.actor.attach.remote(p.name, p.handle) if d.node_id == p.node_id
                                 else d.actor.link.remote(p.name, p.actor, p.pool.cache.dtype))
        ray.get(calls)

    async def pull(self, pull: Pull) -> int:
        """On the decode actor, in order with its steps: the prompt's blocks (the rest of dst_blocks is room)."""
        dst = self.by_name[pull.dst.name]
        return await remote(dst.name, dst.actor.pull, pull.src.name, pull.src_blocks,
                            pull.dst_blocks[:len(pull.src_blocks)], source=pull.src.name)

    # ---------------- faults ----------------
    def watch(self, on_death: Callable[[str, str], None], on_back: Callable[[str], None]) -> None:
        """Ping every actor on the running loop: on_death(name, why) when one is gone; on_back(name) when Ray
        has restarted it and it is ready for work again."""
        self.watchers = [asyncio.create_task(self._watch(w, on_death, on_back), name=f"watch-{w.name}")
                         for w in self.instances]

    async def _watch(self, w: RayWorker, on_death, on_back) -> None:
        from ray.exceptions import ActorDiedError, RayActorError

        while True:
            await asyncio.sleep(PING_S)
            try:
                await w.actor.ping.options(concurrency_group="io").remote()
                continue
            except RayActorError as e:
                on_death(w.name, f"instance {w.name} died: {str(e).splitlines()[0]}")
                if isinstance(e, ActorDiedError) or not self.config.ray_max_restarts:
                    return
            while True:  # restarting: back once it answers (ActorDiedError: out of restarts)
                try:
                    info = await w.actor.info.remote()
                    break
                except ActorDiedError:
                    return
                except RayActorError:
                    await asyncio.sleep(PING_S)
            w.reset(info)
            await asyncio.get_running_loop().run_in_executor(None, self._connect, [w])
            log.warning("instance %s restarted by Ray (pid %s); back in dispatch", w.name, w.pid)
            on_back(w.name)

    def close(self) -> None:
        """End the actors, free the placement groups, disconnect (and stop the Ray we started). Never raises and
        never hangs: a Ray whose raylet is already gone (a signal sent to the whole process group) may not
        answer, so past CLOSE_TIMEOUT_S the actors of this machine are killed and the rest is left to Ray."""
        for t in self.watchers:
            t.cancel()
        worker = threading.Thread(target=self._teardown, name="ray-teardown", daemon=True)
        worker.start()
        worker.join(CLOSE_TIMEOUT_S)
        if worker.is_alive():
            log.warning("Ray did not shut down within %g s: killing this machine's actors", CLOSE_TIMEOUT_S)
            for w in getattr(self, "instances", []):
                if w.node_id == self.node_id:
                    with contextlib.suppress(OSError):
                        os.kill(w.pid, signal.SIGKILL)

    def _teardown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        steps = [lambda a=a: ray.kill(a) for a in self.actors]
        steps += [lambda g=g: remove_placement_group(g) for g in self.groups.values()]
        steps += [ray.shutdown] if self.started_ray else []
        for step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001  (a dead raylet: whatever is left, Ray's processes end with it)
                log.warning("Ray teardown: %r", e)
