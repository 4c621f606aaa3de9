"""--plan plan.json: run a placement the planner wrote, if this engine and machine can.

    {"mode": "disagg", "prefill": {"tp": 1, "pp": 1, "instances": 1}, "decode": {...},
     "devices": {"prefill_devices": ["cuda:0"], "decode_devices": ["cuda:1"]}}
    {"mode": "colocated", "colocated": {"tp": 1, "pp": 1, "instances": 2}, "devices": ["cuda:0", "cuda:1"],
     "chunked_prefill": true}
    optional, the precision the plan was priced with (the profiles' engine settings, as server flags):
    "precision": {"dtype": "bfloat16", "weights": "dense", "decode_dtype": "float32", "decode_weights": "native"}

A plan across nodes names each instance's node ("node1/cuda:0", "node1/cpu:0", as
scheduler/planner/placement.py writes them); it runs with --cluster ray, where Ray's placement groups check
each node's devices. Under the default --cluster local, every device must be one of this machine's.
"""
from __future__ import annotations

import json
import os

from engine.config import parse_device, split_node


class PlanError(ValueError):
    """The plan cannot run here; the message says why (the CLI exits 2 with it)."""


PRECISION_KEYS = ("dtype", "weights", "decode_dtype", "decode_weights")


def load_plan(path: str, cluster: str = "local") -> dict:
    """Plan file -> engine.args.EngineArgs overrides: mode, device lists, chunked prefill (colocated), and the
    precision it was priced with (EngineConfig checks the values).
    cluster: the --cluster it will run under (ray: devices may be on other nodes)."""
    try:
        with open(path, encoding="utf-8") as f:
            plan = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"cannot read plan {path}: {e}") from None
    if not isinstance(plan, dict) or plan.get("mode") not in ("disagg", "colocated"):
        raise PlanError(f"plan {path}: 'mode' must be 'disagg' or 'colocated'")
    mode = plan["mode"]
    roles = ("prefill", "decode") if mode == "disagg" else ("colocated",)
    for role in roles + tuple(k for k in ("prefill", "decode", "colocated") if k not in roles):
        sec = plan.get(role)
        if sec is None:
            continue
        if not isinstance(sec, dict):
            raise PlanError(f"plan {path}: '{role}' must be an object")
        for key, what in (("tp", "tensor parallelism"), ("pp", "pipeline parallelism")):
            deg = sec.get(key, 1)
            if deg != 1:
                raise PlanError(f"plan needs {what} {deg} for {role}; this engine has none yet (tp = pp = 1 "
                                "only): plan with --max-tp 1 --max-pp 1 (python -m scheduler.planner.placement)")
    devices = plan.get("devices")
    if mode == "disagg":
        if not isinstance(devices, dict):
            raise PlanError(f"plan {path}: disagg 'devices' must be an object with prefill_devices and "
                            "decode_devices lists")
        out = {"mode": mode, "prefill_devices": devices.get("prefill_devices") or [],
               "decode_devices": devices.get("decode_devices") or []}
        lists = {"prefill": out["prefill_devices"], "decode": out["decode_devices"]}
    else:
        if isinstance(devices, dict):
            devices = devices.get("devices")
        chunked = plan.get("chunked_prefill", False)
        if not isinstance(chunked, bool):
            raise PlanError(f"plan {path}: 'chunked_prefill' must be true or false")
        out = {"mode": mode, "devices": devices or [], "chunked_prefill": chunked}
        lists = {"colocated": out["devices"]}
    for role, devs in lists.items():
        if not isinstance(devs, list) or not devs or not all(isinstance(d, str) for d in devs):
            raise PlanError(f"plan {path}: {role} devices must be a non-empty list of device names")
        want = (plan.get(role) or {}).get("instances")
        if want is not None and want != len(devs):
            raise PlanError(f"plan {path}: {role} has {want} instances but {len(devs)} devices")
        for d in devs:
            check_device(d, cluster)
    precision = plan.get("precision", {})
    allowed = PRECISION_KEYS if mode == "disagg" else PRECISION_KEYS[:2]
    if not isinstance(precision, dict) or not all(k in allowed and isinstance(v, str) for k, v in precision.items()):
        raise PlanError(f"plan {path}: 'precision' must map {', '.join(allowed)} to names")
    return out | precision


def check_device(spec: str, cluster: str = "local") -> None:
    """Raise PlanError unless `spec` names a device this process can use (cluster ray: a well-formed device
    of some node; Ray's placement checks that the node has it)."""
    try:
        node, local = split_node(spec)
        kind, idx = parse_device(local)
    except ValueError as e:
        raise PlanError(str(e)) from None
    if node is not None and cluster != "ray":
        raise PlanError(f"plan places instances on several nodes ({spec}): run it with --cluster ray "
                        "[--ray-address ADDR]")
    if cluster == "ray":
        return
    if kind == "cuda":
        import torch  # lazy: only plans naming CUDA devices need to ask

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if idx >= have:
            raise PlanError(f"plan needs {spec} but this machine has {have} CUDA device(s)")
    elif idx is not None:
        missing = sorted(set(idx) - os.sched_getaffinity(0))
        if missing:
            raise PlanError(f"plan needs {spec} but CPU cores {missing} are not available to this process")
