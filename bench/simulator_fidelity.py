"""Simulator fidelity: SLO attainment the planner's simulator predicts vs what the load tester measures
against the real server, same requests, same arrival times (DistServe's Table 2, on our CPU engine).

    make bench-simulator [ARGS="--quick"]       (python -m bench.simulator_fidelity --help)

Per mode (disagg: prefill cpu:C0 + decode cpu:C1; colocated and chunked: one instance on cpu:C0-C1):
1. profile the instance configurations it uses (scheduler/profile.py; or --profile-dir);
2. start the real server (float32), send a few requests one at a time (unloaded): their TTFT/TPOT
   set the SLOs (x --slo-scale), and what they exceed the profile's prediction by is the per-step
   overhead outside the forward (HTTP, asyncio loop, token emission), folded into the constant terms;
3. at each rate, the same seeded Poisson send times and lengths go to the server through the load
   tester and to scheduler.simulator.simulate with the same layout and scheduler limits.
Writes OUT/fidelity.json and OUT/fidelity.md (the table) and prints it.

Workload: ShareGPT prompts (bench/sharegpt.py, DistServe's preprocessing) cut to a length drawn
uniformly from [--min-prompt, --max-prompt] tokens, outputs uniform in [--min-output, --max-output]
tokens (ignore_eos): the lengths are capped so a rate point runs in about a minute on this CPU.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from bench.arrivals import ArrivalSpec, send_times
from bench.client import ClientConfig, fetch_model_name, run_load
from bench.datasets import RequestSpec, load_dataset
from bench.metrics import summarize
from engine.config import CacheConfig, SchedulerConfig
from scheduler.latency import Profile, load_profile
from scheduler.profile import Grid, build_profile, fold_overhead, profile_json
from scheduler.simulator import Layout, Parallel, simulate
from scheduler.workload import SLO

CORES = sorted(os.sched_getaffinity(0))
C0, C1 = CORES[0], CORES[-1]
MODES = {  # name -> (server flags, simulated layout, profile tp = cores per instance)
    "disagg": (["--mode", "disagg", "--prefill-devices", f"cpu:{C0}", "--decode-devices", f"cpu:{C1}"],
               Layout("disagg", prefill=Parallel(1), decode=Parallel(1)), 1),
    "colocated": (["--mode", "colocated", "--devices", f"cpu:{C0}-{C1}"],
                  Layout("colocated", colocated=Parallel(len(CORES))), len(CORES)),
    "chunked": (["--mode", "colocated", "--chunked-prefill", "--devices", f"cpu:{C0}-{C1}"],
                Layout("colocated", colocated=Parallel(len(CORES)), chunked=True), len(CORES)),
}


def workload(args, tok) -> list[RequestSpec]:
    base = load_dataset("sharegpt", tok, args.num_requests, args.seed, 2048, None)
    rng = random.Random(args.seed)
    out = []
    for s in base:
        ids = s.prompt_ids[:rng.randint(args.min_prompt, args.max_prompt)]
        out.append(RequestSpec(ids, tok.decode(ids), len(ids), rng.randint(args.min_output, args.max_output)))
    return out


# ---- the real server -------------------------------------------------------------------------------

def start_server(flags: list[str], port: int, max_num_seqs: int) -> subprocess.Popen:
    cmd = [sys.executable, "server.py", "--port", str(port), "--dtype", "float32", "--log-level", "WARNING",
           "--max-num-seqs", str(max_num_seqs), *flags]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 300

    async def ready() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(f"{url}/health") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False
    while not asyncio.run(ready()):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {' '.join(cmd)}")
        time.sleep(1)
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def calibrate(cfg: ClientConfig, specs: list[RequestSpec], prof: Profile, tp: int, n: int) -> dict:
    """Unloaded requests one at a time: TTFT/TPOT medians, and the per-step overhead (ms) the real
    server shows beyond the profile's prediction (TTFT vs one prefill; TPOT vs one batch-1 step)."""
    model = prof.model_for(tp, 1)
    asyncio.run(run_load(specs[:1], [0.0], cfg))  # warm-up: first-request costs are not steady state
    ttft, tpot, d_pre, d_dec = [], [], [], []
    for s in specs[:n]:
        r = asyncio.run(run_load([s], [0.0], cfg))[0]
        if not r.success:
            raise RuntimeError(f"calibration request failed: {r.error}")
        ttft.append(r.ttft)
        tpot.append(r.tpot)
        d_pre.append(r.ttft * 1e3 - model.prefill_ms([s.prompt_len]))
        if s.output_len > 1:
            d_dec.append(r.tpot * 1e3 - model.decode_ms(s.prompt_len + s.output_len // 2, 1))
    return {"ttft_s": statistics.median(ttft), "tpot_s": statistics.median(tpot),
            "overhead_prefill_ms": statistics.median(d_pre), "overhead_decode_ms": statistics.median(d_dec)}


# ---- one mode ------------------------------------------------------------------------------------

def capacity(prof: Profile, tp: int, mode: str, specs: list[RequestSpec]) -> float:
    """Rough requests/s the layout sustains (sets the rate grid only): the busier phase's work per request."""
    m = prof.model_for(tp, 1)
    p = statistics.mean(s.prompt_len for s in specs)
    o = statistics.mean(s.output_len for s in specs)
    b = 8  # a typical decode batch under load
    pre_s, dec_s = m.prefill_ms([round(p)]) / 1e3, o * m.decode_ms(round(b * (p + o / 2)), b) / b / 1e3
    if mode != "disagg":
        return 1.0 / (pre_s + dec_s)
    f = prof.interference  # under load both instances are busy: each runs at its interference factor
    return 1.0 / max(pre_s * f.get("prefill", 1.0), dec_s * f.get("decode", 1.0))


def run_mode(mode: str, args, specs: list[RequestSpec], prof: Profile) -> dict:
    flags, layout, tp = MODES[mode]
    sched = SchedulerConfig(max_num_seqs=args.max_num_seqs)  # the server's limits (its other flags: defaults)
    proc = start_server(flags, args.port, args.max_num_seqs)
    url = f"http://127.0.0.1:{args.port}"
    try:
        client = ClientConfig(url, asyncio.run(fetch_model_name(url)), progress=False)
        cal = calibrate(client, specs, prof, tp, args.calibration_requests)
        c = prof.tp[tp]
        sim_prof = dataclasses.replace(prof, tp={**prof.tp, tp: fold_overhead(
            c, cal["overhead_prefill_ms"], cal["overhead_decode_ms"])})
        slo = SLO(cal["ttft_s"] * args.slo_scale, cal["tpot_s"] * args.slo_scale)
        cap = capacity(sim_prof, tp, mode, specs)
        print(f"[{mode}] unloaded TTFT {cal['ttft_s'] * 1e3:.0f} ms TPOT {cal['tpot_s'] * 1e3:.1f} ms; overhead "
              f"prefill {cal['overhead_prefill_ms']:.1f} ms decode {cal['overhead_decode_ms']:.1f} ms; SLO "
              f"{slo.ttft * 1e3:.0f}/{slo.tpot * 1e3:.0f} ms; est. capacity {cap:.2f} req/s", flush=True)
        lengths = [(s.prompt_len, s.output_len) for s in specs]
        rows = []
        for frac in args.load:
            rate = round(frac * cap, 3)
            times = send_times(ArrivalSpec("poisson"), rate, len(specs), args.seed)
            results = asyncio.run(run_load(specs, times, client))
            real = summarize(results, slo.ttft, slo.tpot)
            sim = simulate(sim_prof, layout, times, lengths, slo, sched)
            row = compare(rate, frac, real, sim, results)
            rows.append(row)
            print(fmt_row(mode, row), flush=True)
    finally:
        stop_server(proc)
    return {"mode": mode, "server_flags": flags, "calibration": cal, "slo": dataclasses.asdict(slo),
            "capacity_estimate": cap, "profile_tp": tp, "rows": rows}


def compare(rate: float, frac: float, real: dict, sim, results) -> dict:
    sr = sim.requests
    row = {"rate": rate, "load": frac, "failed": real["num_failed"]}
    for key, t, p in (("ttft", True, False), ("tpot", False, True), ("both", True, True)):
        row[f"real_{key}"] = 100 * real[f"attainment_{key}"]
        row[f"sim_{key}"] = 100 * sim.attainment(t, p)
    row["diff"] = row["sim_both"] - row["real_both"]
    row["within_2"] = abs(row["diff"]) <= 2.0
    row["real_ttft_mean_ms"] = 1e3 * (real["ttft_mean"] or 0)
    row["real_tpot_mean_ms"] = 1e3 * (real["tpot_mean"] or 0)
    row["sim_ttft_mean_ms"] = 1e3 * statistics.mean(r.ttft for r in sr if r.ttft is not None)
    row["sim_tpot_mean_ms"] = 1e3 * statistics.mean(r.tpot or 0.0 for r in sr if r.finished)
    return row


# ---- output --------------------------------------------------------------------------------------

HEADER = ("| mode | rate (req/s) | load | real TTFT/TPOT/both % | sim TTFT/TPOT/both % | diff (pts) | within 2 |"
          " TTFT mean real/sim ms | TPOT mean real/sim ms |")


def fmt_row(mode: str, r: dict) -> str:
    return (f"| {mode} | {r['rate']:.3g} | {r['load']:.2f} | {r['real_ttft']:.1f} / {r['real_tpot']:.1f} / "
            f"{r['real_both']:.1f} | {r['sim_ttft']:.1f} / {r['sim_tpot']:.1f} / {r['sim_both']:.1f} | "
            f"{r['diff']:+.1f} | {'yes' if r['within_2'] else 'NO'} | {r['real_ttft_mean_ms']:.0f} / "
            f"{r['sim_ttft_mean_ms']:.0f} | {r['real_tpot_mean_ms']:.1f} / {r['sim_tpot_mean_ms']:.1f} |")


def markdown(doc: dict) -> str:
    lines = [f"Simulator fidelity ({doc['date']}, {doc['command']})", "",
             f"Workload: {doc['workload']}", "", HEADER, "|" + "---|" * 9]
    for m in doc["modes"]:
        lines += [fmt_row(m["mode"], r) for r in m["rows"]]
    lines.append("")
    for m in doc["modes"]:
        c = m["calibration"]
        lines.append(f"- {m['mode']}: SLO TTFT {m['slo']['ttft'] * 1e3:.0f} ms / TPOT {m['slo']['tpot'] * 1e3:.0f} ms "
                     f"({doc['slo_scale']} x unloaded {c['ttft_s'] * 1e3:.0f} / {c['tpot_s'] * 1e3:.1f} ms); "
                     f"overhead folded in: prefill {c['overhead_prefill_ms']:.1f} ms, decode "
                     f"{c['overhead_decode_ms']:.1f} ms per step")
    lines.append(f"- profile interference factors (step time while the other instance is busy): {doc['interference']}")
    return "\n".join(lines) + "\n"


def workload_grid(args) -> Grid:
    """The profile grid over the sizes this workload runs: prompts up to --max-prompt (batches of a few),
    decode contexts up to prompt + output, batches to 32. One linear formula fits a narrow range far
    better than the profiler's default 16-1024 tokens."""
    hi = args.max_prompt
    lens = tuple(sorted({args.min_prompt, hi // 4, hi // 2, 3 * hi // 4, hi}))
    ctx = tuple(sorted({args.min_prompt, (args.min_prompt + hi) // 2, hi + args.max_output}))
    return Grid(prefill_batch=(1, 2, 4), prefill_len=lens, max_prefill_tokens=4 * hi,
                mixed=((args.min_prompt, hi), (hi // 4, hi // 2, hi)), decode_batch=(1, 2, 4, 8, 16, 32),
                decode_ctx=ctx, warmup=1, repeats=2 if args.quick else 3)


def get_profile(args) -> Profile:
    if args.profile_dir:
        return load_profile(Path(args.profile_dir) / "profile.json")
    import torch

    from engine.engine import resolve_dtype
    from engine.loader import load_checkpoint
    from engine.model import LlamaModel

    ckpt = load_checkpoint()
    model = LlamaModel(ckpt.config, ckpt.weights, resolve_dtype("float32", torch.device("cpu")))
    devices = [f"cpu:{C0}"] + ([f"cpu:{C0}-{C1}"] if any(m != "disagg" for m in args.modes) else [])
    prof, details = build_profile(model, ckpt.name, devices, workload_grid(args), CacheConfig(),
                                  neighbor=f"cpu:{C1}" if C1 != C0 else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(profile_json(prof, details), indent=1))
    return prof


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.simulator_fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="~5 minutes: fewer requests and rates, small profile grid")
    p.add_argument("--modes", default=None, help="comma list of disagg,colocated,chunked")
    p.add_argument("--profile-dir", help="reuse DIR/profile.json (from an earlier run) instead of profiling")
    p.add_argument("--num-requests", type=int)
    p.add_argument("--load", help="comma list of rates as fractions of the estimated capacity")
    p.add_argument("--slo-scale", type=float, default=3.0, help="SLO = scale x unloaded TTFT / TPOT")
    p.add_argument("--calibration-requests", type=int, default=5)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=128)
    p.add_argument("--min-output", type=int, default=8)
    p.add_argument("--max-output", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8471)
    p.add_argument("--out", default="bench/out/simulator-fidelity")
    args = p.parse_args(argv)
    args.modes = (args.modes or ("disagg,colocated" if args.quick else "disagg,colocated,chunked")).split(",")
    args.num_requests = args.num_requests or (24 if args.quick else 80)
    args.load = [float(x) for x in (args.load or "0.3,0.6,0.9,1.2,1.5").split(",")]
    from engine.loader import load_tokenizer

    specs = workload(args, load_tokenizer())
    t0 = time.time()
    prof = get_profile(args)
    print(f"profile ready in {time.time() - t0:.0f} s", flush=True)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": "python -m bench.simulator_fidelity " +
           " ".join(argv if argv is not None else sys.argv[1:]), "machine": f"{os.cpu_count()} CPU cores",
           "workload": f"{len(specs)} ShareGPT prompts cut to U[{args.min_prompt},{args.max_prompt}] tokens, outputs "
           f"U[{args.min_output},{args.max_output}] tokens, Poisson arrivals (seed {args.seed}), float32",
           "slo_scale": args.slo_scale, "interference": prof.interference, "modes": []}
    print(HEADER, flush=True)
    for mode in args.modes:
        doc["modes"].append(run_mode(mode, args, specs, prof))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(doc, indent=1))
    (out / "fidelity.md").write_text(markdown(doc))
    print(markdown(doc))
    rows = [r for m in doc["modes"] for r in m["rows"]]
    print(f"{sum(r['within_2'] for r in rows)}/{len(rows)} rows within 2 points; total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
