"""Simulator fidelity: SLO attainment the planner's simulator predicts vs what the load tester measures
against the real server, same requests, same arrival times (DistServe's Table 2, on our CPU engine).

    make bench-simulator [ARGS="--quick"]       (python -m bench.simulator_fidelity --help)

Per mode (disagg: prefill cpu:C0 + decode cpu:C1; colocated and chunked: one instance on cpu:C0-C1):
1. profile the instance configurations it uses in isolation (scheduler/profile.py; or --profile-dir);
2. start the real server (float32, --step-trace), send a few requests one at a time (unloaded): their
   TTFT/TPOT set the SLOs (x --slo-scale); the time each TTFT spends outside the engine's traced
   prefill iteration is the front end's share (HTTP, tokenizing, delivery);
3. the in-server model: other requests (seed + 1, ...) at the --fit-load loads; the latency
   model is fitted to the steps the server traced while serving them (scheduler/trace_fit.py: iteration
   times with the event loop and the other instance competing, interference split out);
4. at each rate, the same seeded Poisson send times and lengths go to the server through the load
   tester and to scheduler.simulator.simulate with the same layout and scheduler limits; simulated
   TTFTs get the front-end time added. The table's "sim" is the in-server model; the isolated
   profile (its unloaded overhead folded into the constant terms) is shown beside it. The last
   column: the rate's real traced step times over the in-server model's price for the same steps
   (1.00: the model prices what ran right, so a gap in attainment comes from elsewhere). At the
   --repeat-at loads the real run is made twice with the same requests and send times: how far two
   real runs differ is the noise floor any simulator is judged against.
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
from scheduler.trace_fit import fit_trace, model_ratios
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


def workload(args, tok, seed: int) -> list[RequestSpec]:
    base = load_dataset("sharegpt", tok, args.num_requests, seed, 2048, None)
    rng = random.Random(seed)
    out = []
    for s in base:
        ids = s.prompt_ids[:rng.randint(args.min_prompt, args.max_prompt)]
        out.append(RequestSpec(ids, tok.decode(ids), len(ids), rng.randint(args.min_output, args.max_output)))
    return out


# ---- the real server -------------------------------------------------------------------------------

def start_server(flags: list[str], port: int, sched: SchedulerConfig) -> subprocess.Popen:
    cmd = [sys.executable, "server.py", "--port", str(port), "--dtype", "float32", "--log-level", "WARNING",
           "--max-num-seqs", str(sched.max_num_seqs), "--max-prefill-tokens", str(sched.max_prefill_tokens), *flags]
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


def steps(url: str) -> list[dict]:
    """The server's step trace since the last call (GET /debug/steps drains it)."""
    async def get() -> list[dict]:
        async with aiohttp.ClientSession() as s, s.get(f"{url}/debug/steps") as r:
            r.raise_for_status()
            return (await r.json())["steps"]
    return asyncio.run(get())


def calibrate(cfg: ClientConfig, specs: list[RequestSpec], prof: Profile, tp: int, n: int) -> dict:
    """Unloaded requests one at a time: TTFT/TPOT medians; the per-step overhead (ms) the real server
    shows beyond the isolated profile's prediction (TTFT vs one prefill; TPOT vs one batch-1 step); and
    the front-end time outside the engine's steps (TTFT minus the traced prefill iteration: HTTP,
    tokenizing, queueing into the loop, delivering the token), which the in-server model adds per request."""
    model = prof.model_for(tp, 1)
    asyncio.run(run_load(specs[:1], [0.0], cfg))  # warm-up: first-request costs are not steady state
    steps(cfg.url)
    ttft, tpot, d_pre, d_dec, front = [], [], [], [], []
    for s in specs[:n]:
        r = asyncio.run(run_load([s], [0.0], cfg))[0]
        if not r.success:
            raise RuntimeError(f"calibration request failed: {r.error}")
        first = next(x for x in steps(cfg.url) if x["prefill"])
        ttft.append(r.ttft)
        tpot.append(r.tpot)
        d_pre.append(r.ttft * 1e3 - model.prefill_ms([s.prompt_len]))
        front.append(r.ttft - (first["end"] - first["start"]))
        if s.output_len > 1:
            d_dec.append(r.tpot * 1e3 - model.decode_ms(s.prompt_len + s.output_len // 2, 1))
    return {"ttft_s": statistics.median(ttft), "tpot_s": statistics.median(tpot),
            "overhead_prefill_ms": statistics.median(d_pre), "overhead_decode_ms": statistics.median(d_dec),
            "front_end_ttft_ms": 1e3 * statistics.median(front)}


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


def roles_of(mode: str) -> tuple[str, ...]:
    return ("prefill", "decode") if mode == "disagg" else ("colocated",)


def in_server_profile(prof: Profile, tp: int, mode: str, iso: Profile, records: list[dict]) -> tuple[Profile, dict]:
    """The profile with this layout's coefficients (and, disaggregated, interference factors) fitted to
    the server's own step trace (scheduler/trace_fit.py); `iso` (the isolated profile) where the trace
    has too few steps the formulas describe (e.g. chunked prefill, whose steps are mostly mixed)."""
    try:
        coeffs, factors, report = fit_trace(records, roles_of(mode))
    except ValueError as e:
        print(f"[{mode}] in-server fit impossible ({e}): the isolated profile stands in", flush=True)
        return iso, {"coeffs": None, "interference": iso.interference, "fit": {"error": str(e), "samples": None}}
    inter = factors if mode == "disagg" else prof.interference
    return dataclasses.replace(prof, tp={**prof.tp, tp: coeffs}, interference=inter), {
        "coeffs": coeffs.to_json(), "interference": factors, "fit": report}


def run_mode(mode: str, args, specs: list[RequestSpec], fit_sets: list[list[RequestSpec]], prof: Profile) -> dict:
    flags, layout, tp = MODES[mode]
    # the server's limits (its other flags: defaults)
    sched = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_prefill_tokens=args.max_prefill_tokens)
    proc = start_server(flags + ["--step-trace", "1000000"], args.port, sched)
    url = f"http://127.0.0.1:{args.port}"
    try:
        client = ClientConfig(url, asyncio.run(fetch_model_name(url)), progress=False, token_ids=True)  # exact lengths
        cal = calibrate(client, specs, prof, tp, args.calibration_requests)
        c = prof.tp[tp]
        iso_prof = dataclasses.replace(prof, tp={**prof.tp, tp: fold_overhead(
            c, cal["overhead_prefill_ms"], cal["overhead_decode_ms"])})
        slo = SLO(cal["ttft_s"] * args.slo_scale, cal["tpot_s"] * args.slo_scale)
        cap = capacity(iso_prof, tp, mode, specs)
        # the in-server fit: other requests (seed + 1, + 2, ...) at a light and an overloaded rate, so the
        # traced steps span the batch shapes of the whole load range (and steps with and without a busy
        # neighbor); their steps as the server ran them
        fit_rates = [round(f * cap, 3) for f in args.fit_load]
        for i, (fit_rate, fit_specs) in enumerate(zip(fit_rates, fit_sets, strict=True)):
            asyncio.run(run_load(fit_specs, send_times(ArrivalSpec("poisson"), fit_rate, len(fit_specs),
                                                       args.seed + 1 + i), client))
        srv_prof, fitted = in_server_profile(prof, tp, mode, iso_prof, steps(url))
        front = cal["front_end_ttft_ms"] / 1e3
        print(f"[{mode}] unloaded TTFT {cal['ttft_s'] * 1e3:.0f} ms TPOT {cal['tpot_s'] * 1e3:.1f} ms; overhead "
              f"prefill {cal['overhead_prefill_ms']:.1f} ms decode {cal['overhead_decode_ms']:.1f} ms; front end "
              f"{front * 1e3:.1f} ms; SLO {slo.ttft * 1e3:.0f}/{slo.tpot * 1e3:.0f} ms; est. capacity {cap:.2f} "
              f"req/s; in-server fit at {fit_rates} req/s: {fitted['fit']['samples']}, interference "
              f"{fitted['interference']}", flush=True)
        lengths = [(s.prompt_len, s.output_len) for s in specs]
        rows, traces = [], {}
        for frac in args.load:
            rate = round(frac * cap, 3)
            times = send_times(ArrivalSpec("poisson"), rate, len(specs), args.seed)
            results = asyncio.run(run_load(specs, times, client))
            traces[str(rate)] = steps(url)  # kept for diagnosis (OUT/traces-MODE.json), not used by the model
            real = summarize(results, slo.ttft, slo.tpot)
            iso = simulate(iso_prof, layout, times, lengths, slo, sched)
            srv = simulate(srv_prof, layout, times, lengths, slo, sched)
            row = compare(rate, frac, real, iso, srv, front, slo)
            if frac in args.repeat_at:  # the real server's own run-to-run spread, same requests and times
                again = summarize(asyncio.run(run_load(specs, times, client)), slo.ttft, slo.tpot)
                steps(url)
                row["real_again_both"] = 100 * again["attainment_both"]
            row["step_ratio"] = model_ratios(traces[str(rate)], srv_prof.model_for(tp, 1), srv_prof.interference,
                                             roles_of(mode))
            rows.append(row)
            print(fmt_row(mode, row), flush=True)
    finally:
        stop_server(proc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"traces-{mode}.json").write_text(json.dumps(traces))
    return {"mode": mode, "server_flags": flags, "calibration": cal, "slo": dataclasses.asdict(slo),
            "capacity_estimate": cap, "profile_tp": tp, "in_server_fit": {"rates": fit_rates, **fitted},
            "rows": rows}


def judged(sim, slo: SLO, front: float) -> dict[str, float]:
    """Attainment (%) of simulated requests, each TTFT plus the front-end time outside the engine."""
    ok_t = [r.ttft is not None and r.ttft + front <= slo.ttft for r in sim.requests]
    ok_p = [r.finished and (r.tpot is None or r.tpot <= slo.tpot) for r in sim.requests]
    n = len(sim.requests)
    return {"ttft": 100 * sum(ok_t) / n, "tpot": 100 * sum(ok_p) / n,
            "both": 100 * sum(a and b for a, b in zip(ok_t, ok_p, strict=True)) / n}


def compare(rate: float, frac: float, real: dict, iso, srv, front: float, slo: SLO) -> dict:
    """One rate: real attainment vs the in-server model (judged) and the isolated profile (iso)."""
    row = {"rate": rate, "load": frac, "failed": real["num_failed"]}
    for name, sim, shift in (("sim", srv, front), ("iso", iso, 0.0)):
        for key, v in judged(sim, slo, shift).items():
            row[f"{name}_{key}"] = v
        row[f"{name}_ttft_mean_ms"] = 1e3 * statistics.mean(r.ttft + shift for r in sim.requests if r.ttft is not None)
        row[f"{name}_tpot_mean_ms"] = 1e3 * statistics.mean(r.tpot or 0.0 for r in sim.requests if r.finished)
    for key in ("ttft", "tpot", "both"):
        row[f"real_{key}"] = 100 * real[f"attainment_{key}"]
    row["diff"] = row["sim_both"] - row["real_both"]
    row["iso_diff"] = row["iso_both"] - row["real_both"]
    row["within_2"] = abs(row["diff"]) <= 2.0
    row["real_ttft_mean_ms"] = 1e3 * (real["ttft_mean"] or 0)
    row["real_tpot_mean_ms"] = 1e3 * (real["tpot_mean"] or 0)
    return row


# ---- output --------------------------------------------------------------------------------------

HEADER = ("| mode | rate (req/s) | load | real TTFT/TPOT/both % | sim TTFT/TPOT/both % | diff (pts) | within 2 |"
          " isolated-profile sim both % (diff) | TTFT mean real/sim ms | TPOT mean real/sim ms |"
          " real step / model: prefill, decode | real again both % |")


def fmt_row(mode: str, r: dict) -> str:
    return (f"| {mode} | {r['rate']:.3g} | {r['load']:.2f} | {r['real_ttft']:.1f} / {r['real_tpot']:.1f} / "
            f"{r['real_both']:.1f} | {r['sim_ttft']:.1f} / {r['sim_tpot']:.1f} / {r['sim_both']:.1f} | "
            f"{r['diff']:+.1f} | {'yes' if r['within_2'] else 'NO'} | {r['iso_both']:.1f} ({r['iso_diff']:+.1f}) | "
            f"{r['real_ttft_mean_ms']:.0f} / {r['sim_ttft_mean_ms']:.0f} | "
            f"{r['real_tpot_mean_ms']:.1f} / {r['sim_tpot_mean_ms']:.1f} | "
            + ", ".join("-" if v is None else f"{v:.2f}" for v in r.get("step_ratio", {}).values())
            + (f" | {r['real_again_both']:.1f} |" if "real_again_both" in r else " | |"))


def markdown(doc: dict) -> str:
    lines = [f"Simulator fidelity ({doc['date']}, {doc['command']})", "",
             f"Workload: {doc['workload']}", "", HEADER, "|" + "---|" * 12]
    for m in doc["modes"]:
        lines += [fmt_row(m["mode"], r) for r in m["rows"]]
    lines.append("")
    for m in doc["modes"]:
        c, f = m["calibration"], m["in_server_fit"]
        fit = (f"fitted to {f['fit']['samples']} traced steps at {f['rates']} req/s (other requests, "
               f"{f['fit'].get('rounds', '?')} rounds), interference {f['interference']}" if f["coeffs"] else
               f"not fitted ({f['fit']['error']}): the isolated profile stands in")
        lines.append(f"- {m['mode']}: SLO TTFT {m['slo']['ttft'] * 1e3:.0f} ms / TPOT {m['slo']['tpot'] * 1e3:.0f} ms "
                     f"({doc['slo_scale']} x unloaded {c['ttft_s'] * 1e3:.0f} / {c['tpot_s'] * 1e3:.1f} ms). "
                     f"In-server model: {fit}, front end "
                     f"{c['front_end_ttft_ms']:.1f} ms per TTFT. Isolated profile: overhead folded into the "
                     f"constants, prefill {c['overhead_prefill_ms']:.1f} ms, decode {c['overhead_decode_ms']:.1f} ms")
    lines.append(f"- isolated profile's interference factors (step time while the other instance is busy): "
                 f"{doc['interference']}")
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
    p.add_argument("--repeat-at", default="0.9", help="loads at which the real run is repeated (its noise floor)")
    p.add_argument("--fit-load", default="0.5,1.4",
                   help="loads of the runs whose step traces fit the in-server model (other requests: seed + 1, ...)")
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=128)
    p.add_argument("--min-output", type=int, default=8)
    p.add_argument("--max-output", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-prefill-tokens", type=int, default=512,
                   help="prompt tokens per prefill batch, server and simulator: past ~500 tokens a CPU batch runs "
                        "slower per token than DistServe's formula can price (it has no (sum l)^2 term)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8471)
    p.add_argument("--out", default="bench/out/simulator-fidelity")
    args = p.parse_args(argv)
    args.modes = (args.modes or ("disagg,colocated" if args.quick else "disagg,colocated,chunked")).split(",")
    args.num_requests = args.num_requests or (24 if args.quick else 80)
    args.load = [float(x) for x in (args.load or "0.3,0.6,0.9,1.2,1.5").split(",")]
    args.fit_load = [float(x) for x in args.fit_load.split(",")]
    args.repeat_at = [float(x) for x in args.repeat_at.split(",") if x]
    from engine.loader import load_tokenizer

    tok = load_tokenizer()
    specs = workload(args, tok, args.seed)
    t0 = time.time()
    prof = get_profile(args)
    print(f"profile ready in {time.time() - t0:.0f} s", flush=True)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": "python -m bench.simulator_fidelity " +
           " ".join(argv if argv is not None else sys.argv[1:]), "machine": f"{os.cpu_count()} CPU cores",
           "workload": f"{len(specs)} ShareGPT prompts cut to U[{args.min_prompt},{args.max_prompt}] tokens, outputs "
           f"U[{args.min_output},{args.max_output}] tokens, Poisson arrivals (seed {args.seed}), float32",
           "slo_scale": args.slo_scale, "interference": prof.interference, "modes": []}
    print(HEADER, flush=True)
    fit_sets = [workload(args, tok, args.seed + 1 + i) for i in range(len(args.fit_load))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:  # written after each mode: a later failure keeps what was measured
        doc["modes"].append(run_mode(mode, args, specs, fit_sets, prof))
        (out / "fidelity.json").write_text(json.dumps(doc, indent=1))
        (out / "fidelity.md").write_text(markdown(doc))
    print(markdown(doc))
    rows = [r for m in doc["modes"] for r in m["rows"]]
    print(f"{sum(r['within_2'] for r in rows)}/{len(rows)} rows within 2 points; total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
