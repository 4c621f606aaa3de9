"""Placement planner CLI: search layouts for a cluster, print the ranking, write the plan file.

    python -m scheduler.planner.placement \
        --profile scheduler/planner/data/distserve-a100/profiler-a100-80g.distserve.json \
        --model facebook/opt-13b --num-nodes 1 --devices-per-node 4 --dataset sharegpt \
        --ttft-slo 0.25 --tpot-slo 0.1 --attainment 0.9 --seeds 3 --out plan.json

This engine runs tp = pp = 1 only: `--max-tp 1 --max-pp 1` restricts the search to plans `server.py --plan`
serves. Progress goes to stderr as each goodput is found (--quiet: none).

Plan file: {"model", "mode": "disagg"|"colocated", "prefill": {"tp","pp","instances"}, "decode": {...},
"goodput" (req/s: the median over the arrival draws), "goodput_per_draw", "goodput_per_device", "slo",
"devices": {"prefill_devices", "decode_devices"} (colocated: {"devices"}), plus how it was found.
Device strings: one per instance, "cuda:N" on one node ("cuda:N,M" for a multi-device instance;
"nodeK/cuda:N,..." across nodes), or "cpu:CORES" for a CPU profile, where a device is one core.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from scheduler.planner.goodput import Workload
from scheduler.planner.latency import Profile, load_profile
from scheduler.planner.options import add_profile_flags, add_slo_flags, profile_of, scheduler_config, slo_of
from scheduler.planner.search import Candidate, Cluster, Planner
from scheduler.planner.simulator import Parallel
from scheduler.planner.workload import SLO, parse_fixed, read_lengths_file, synth_lengths, unit_arrivals


def dataset_lengths(args: argparse.Namespace) -> tuple[list[tuple[int, int]], str]:
    """(lengths, provenance). A lengths file wins; then the real dataset through bench/ when a
    tokenizer is given; otherwise lengths synthesized to the dataset's published statistics."""
    if args.lengths_file:
        return read_lengths_file(args.lengths_file)[: args.num_requests], f"file:{args.lengths_file}"
    fixed = parse_fixed(args.dataset)
    if fixed:
        return [fixed] * args.num_requests, args.dataset
    if args.tokenizer:
        # lazy: the planner runs without bench/, the dataset packages and a tokenizer
        from bench.datasets import load_dataset
        from engine.loader import load_tokenizer

        tok = load_tokenizer(None if args.tokenizer == "default" else args.tokenizer)
        specs = load_dataset(args.dataset, tok, args.num_requests, args.seed, args.max_model_len)
        return [(s.prompt_len, s.output_len) for s in specs], f"{args.dataset} (tokenized)"
    return synth_lengths(args.dataset, args.num_requests, args.seed), f"{args.dataset} (synthetic lengths)"


def _device_strings(profile: Profile, cluster: Cluster, sizes: list[int]) -> list[str]:
    """Consecutive devices for instances of the given sizes, in order."""
    out, nxt = [], 0
    for size in sizes:
        ids = list(range(nxt, nxt + size))
        nxt += size
        out.append(_instance_devices(profile, cluster, ids))
    return out


def _instance_devices(profile: Profile, cluster: Cluster, ids: list[int]) -> str:
    """One instance's devices (global ids, node-major): "cpu:0-1" / "cuda:0,1" on one node; across nodes each
    device names its node, "node1/cuda:0" (CPU cores of one node: "node1/cpu:0-1"), which needs --cluster ray."""
    g = cluster.devices_per_node
    if profile.device_kind == "cpu" and ids == list(range(ids[0], ids[0] + len(ids))) and (
            cluster.num_nodes == 1 or ids[0] // g == ids[-1] // g):
        lo, hi = (ids[0], ids[-1]) if cluster.num_nodes == 1 else (ids[0] % g, ids[-1] % g)
        cores = f"cpu:{lo}" if lo == hi else f"cpu:{lo}-{hi}"
        return cores if cluster.num_nodes == 1 else f"node{ids[0] // g}/{cores}"
    kind = "cpu" if profile.device_kind == "cpu" else "cuda"
    if cluster.num_nodes == 1:
        return f"{kind}:" + ",".join(map(str, ids))
    return ",".join(f"node{i // g}/{kind}:{i % g}" for i in ids)


def _unit_device_strings(profile: Profile, cluster: Cluster, c: Candidate) -> tuple[list[str], list[str]]:
    """Algorithm 2: unit u spans nodes u*s..u*s+s-1; each instance puts its stage j on node j."""
    unit, g, s = c.unit, cluster.devices_per_node, c.nodes_per_unit
    prefill, decode = [], []
    for u in range(cluster.num_nodes // s):
        local = 0
        for spec, sink in ((unit.prefill, prefill), (unit.decode, decode)):
            per_node = spec.tp * (spec.pp // s)
            for _ in range(spec.count):
                ids = [(u * s + j) * g + local + k for j in range(s) for k in range(per_node)]
                local += per_node
                sink.append(_instance_devices(profile, cluster, ids))
    return prefill, decode


def plan_json(c: Candidate, profile: Profile, cluster: Cluster, slo: SLO, workload: dict) -> dict:
    lay = c.layout

    def spec(x: Parallel) -> dict:
        return {"tp": x.tp, "pp": x.pp, "instances": x.count}
    plan = {"model": profile.model, "mode": lay.mode, "goodput": c.goodput, "goodput_per_device": c.per_device,
            "goodput_per_draw": list(c.result.per_draw),
            "devices_used": lay.devices, "slo": {"ttft": slo.ttft, "tpot": slo.tpot, "attainment": slo.attainment},
            "algorithm": c.algorithm, "method": c.method, "profile_device": profile.device,
            "cluster": {"num_nodes": cluster.num_nodes, "devices_per_node": cluster.devices_per_node},
            "workload": workload}
    if profile.precision:  # the engine settings the plan was priced with (server.py --plan applies them)
        plan["precision"] = ({k: v for k, v in profile.precision.items() if not k.startswith("decode_")}
                             if lay.mode == "colocated" else dict(profile.precision))
    if lay.mode == "colocated":
        plan |= {"prefill": spec(lay.colocated), "decode": spec(lay.colocated), "chunked_prefill": lay.chunked,
                 "devices": {"devices": _device_strings(profile, cluster, [lay.colocated.tp * lay.colocated.pp]
                                                        * lay.colocated.count)}}
        return plan
    if c.unit is not None:
        pre, dec = _unit_device_strings(profile, cluster, c)
    else:
        sizes = [lay.prefill.tp * lay.prefill.pp] * lay.prefill.count
        sizes += [lay.decode.tp * lay.decode.pp] * lay.decode.count
        devs = _device_strings(profile, cluster, sizes)
        pre, dec = devs[: lay.prefill.count], devs[lay.prefill.count:]
    return plan | {"prefill": spec(lay.prefill), "decode": spec(lay.decode),
                   "devices": {"prefill_devices": pre, "decode_devices": dec}}


def run_search(profile: Profile, cluster: Cluster, work: Workload, algorithm: str = "alg1",
               colocated: bool = True, max_tp: int | None = None, max_pp: int | None = None,
               colocated_profile: Profile | None = None,
               progress: Callable[[str], None] | None = None) -> list[Candidate]:
    """Every evaluated candidate, best first: joint or replicated results ahead of bare estimates.
    `colocated_profile` prices the colocated baselines with another engine's coefficients (DistServe
    compared against vLLM, whose A100 profile is profiler-a100-80g.vllm.json)."""
    planner = Planner(profile, cluster, work, max_tp=max_tp, max_pp=max_pp, progress=progress)
    cands = planner.algorithm1() if algorithm == "alg1" else planner.algorithm2()
    if colocated:
        base = planner if colocated_profile is None else Planner(colocated_profile, cluster, work, max_tp=max_tp,
                                                                  max_pp=max_pp, progress=progress)
        cands += base.colocated()
    return sorted(cands, key=lambda c: (c.method == "phases", -c.goodput, c.layout.devices))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m scheduler.planner.placement", description=__doc__.split("\n")[0])
    add_profile_flags(ap)
    add_slo_flags(ap)
    ap.add_argument("--num-nodes", type=int, default=1)
    ap.add_argument("--devices-per-node", type=int, required=True)
    ap.add_argument("--dataset", default="sharegpt", help="sharegpt | humaneval | longbench-synthetic | fixed:IN:OUT")
    ap.add_argument("--lengths-file", help="JSON list of [prompt_len, output_len]; overrides --dataset")
    ap.add_argument("--tokenizer", help="model path (or 'default') whose tokenizer measures the real dataset "
                    "via bench.datasets; without it lengths are synthesized")
    ap.add_argument("--max-model-len", type=int, default=2048, help="with --tokenizer: longest prompt + output")
    ap.add_argument("--num-requests", type=int, default=300)
    ap.add_argument("--arrival", default="poisson", choices=["poisson", "gamma", "fixed"])
    ap.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: coefficient of variation")
    ap.add_argument("--seed", type=int, default=0, help="first arrival draw's seed (and the lengths' seed)")
    ap.add_argument("--seeds", type=int, default=3, help="arrival draws per layout (seeds SEED, SEED+1, ...): "
                    "a layout's goodput is the median over them, shown with their range")
    ap.add_argument("--algorithm", default="alg1", choices=["alg1", "alg2"],
                    help="alg1: high node affinity (independent phases); alg2: low affinity (per-node segments)")
    ap.add_argument("--max-tp", type=int, help="largest tensor-parallel degree to consider (default: a node); "
                    "this engine runs tp 1 only")
    ap.add_argument("--max-pp", type=int, help="largest pipeline degree to consider (default: the cluster); "
                    "this engine runs pp 1 only")
    ap.add_argument("--colocated-profile", help="price the colocated baselines with this profile instead")
    ap.add_argument("--no-colocated", action="store_true", help="skip the colocated baselines")
    ap.add_argument("--top", type=int, default=12, help="candidates to print")
    ap.add_argument("--quiet", action="store_true", help="no progress lines (on stderr) while searching")
    ap.add_argument("--out", default="out/plan.json", help="plan file to write (default: out/plan.json)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    return args


def print_ranking(cands: list[Candidate], top: int, draws: int, seeds: list[int]) -> None:
    spread = f"[min-max of {draws}]" if draws > 1 else ""
    print(f"{'rank':>4}  {'goodput/dev':>11}  {spread:<19}  {'goodput':>8}  {'devs':>4}  {'method':<10}  layout")
    for i, c in enumerate(cands[:top], 1):
        d = c.layout.devices
        rng = f"[{c.result.low / d:.3f}-{c.result.high / d:.3f}]" if draws > 1 else ""
        print(f"{i:>4}  {c.per_device:>11.3f}  {rng:<19}  {c.goodput:>8.3f}  {d:>4}  {c.method:<10}  {c.describe()}")
    over = f"the median over {draws} arrival draws (seeds {seeds[0]}-{seeds[-1]}), with their range" if draws > 1 \
        else f"one arrival draw (seed {seeds[0]}; --seeds N for the median and range of N)"
    print(f"goodput: req/s within the SLOs, {over}.\n"
          "method: joint = the whole layout simulated; replicated = one instance simulated, times the instances;\n"
          "        phases = an estimate, never simulated whole (the smaller of n x prefill-alone and m x decode-alone\n"
          "        goodput, optimistic): phases rows rank below every simulated row, whatever their value.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    profile = profile_of(args)
    slo = slo_of(args)
    lengths, source = dataset_lengths(args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    draws = np.stack([unit_arrivals(len(lengths), args.arrival, args.cv, s) for s in seeds])
    work = Workload(lengths, draws, slo, scheduler_config(profile, args))
    cluster = Cluster(args.num_nodes, args.devices_per_node)
    # the colocated baselines run one precision: --colocated-profile, else --profile when phases are split
    coloc_path = args.colocated_profile or (args.profile if args.decode_profile else None)
    coloc = load_profile(coloc_path, args.model) if coloc_path else None
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    if progress:
        progress(f"searching {profile.model} on {cluster.num_nodes}x{cluster.devices_per_node}, {len(seeds)} "
                 f"arrival draws of {len(lengths)} requests per layout; each goodput as it is found:")
    cands = run_search(profile, cluster, work, args.algorithm, not args.no_colocated, args.max_tp, args.max_pp, coloc,
                       progress)
    elapsed = time.perf_counter() - t0
    mean_in, mean_out = np.mean([p for p, _ in lengths]), np.mean([o for _, o in lengths])
    print(f"{profile.model} on {cluster.num_nodes}x{cluster.devices_per_node} {profile.device}; workload {source}, "
          f"{len(lengths)} requests, mean {mean_in:.0f} in / {mean_out:.0f} out; SLO TTFT {slo.ttft}s TPOT "
          f"{slo.tpot}s at {slo.attainment:.0%}; searched in {elapsed:.1f}s")
    print_ranking(cands, args.top, len(seeds), seeds)
    best = cands[0] if cands and cands[0].goodput > 0 else None
    if best is None:
        print("no layout meets the SLOs at any rate", file=sys.stderr)
        return 1
    print(f"best: {best.describe()} -> {best.goodput:.3f} req/s, {best.per_device:.3f} req/s per device")
    if args.out:
        workload = {"source": source, "num_requests": len(lengths), "mean_prompt": float(mean_in),
                    "mean_output": float(mean_out), "arrival": args.arrival, "seed": args.seed, "seeds": seeds}
        priced = coloc if coloc is not None and best.layout.mode == "colocated" else profile
        plan = plan_json(best, priced, cluster, slo, workload) | {"search_seconds": elapsed}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(plan, indent=2) + "\n")
        print(f"wrote {args.out}")
        if any(x.tp > 1 or x.pp > 1 for x in (best.layout.prefill, best.layout.decode, best.layout.colocated) if x):
            print("note: this engine runs tp = pp = 1 only, so server.py --plan refuses this plan; "
                  "--max-tp 1 --max-pp 1 restricts the search to plans it serves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
