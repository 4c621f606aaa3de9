"""One mode of the simulator-fidelity benchmark (bench/simulator_fidelity.py): start the real server,
calibrate on unloaded requests, fit the in-server latency model to its step trace, then at each rate
send the same requests to the server (--repeats times, in rounds over all the rates) and to the
simulator and compare their SLO attainment against the real runs' own spread."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import statistics
from pathlib import Path

import aiohttp
import numpy as np

from bench.client import ClientConfig, fetch_model_name, run_load
from bench.datasets import RequestSpec
from bench.fidelity_report import fmt_row, noise_band
from bench.metrics import summarize
from bench.server_process import ServerProcess
from engine.config import SchedulerConfig
from scheduler.planner.latency import LatencyModel, Profile
from scheduler.planner.profile import fold_overhead
from scheduler.planner.simulator import Layout, Parallel, SimResult, simulate
from scheduler.planner.trace_fit import fit_trace, model_ratios, residuals
from scheduler.planner.workload import SLO, ArrivalSpec, send_times
from scheduler.runtime.trace import StepRecord

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


# ---- the real server -------------------------------------------------------------------------------

def steps(url: str) -> list[StepRecord]:
    """The server's step trace since the last call (GET /debug/steps drains it)."""
    async def get() -> list[dict]:
        async with aiohttp.ClientSession() as s, s.get(f"{url}/debug/steps") as r:
            r.raise_for_status()
            return (await r.json())["steps"]
    return [StepRecord.from_json(d) for d in asyncio.run(get())]


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
        if not r.finished:
            raise RuntimeError(f"calibration request failed: {r.error}")
        first = next(x for x in steps(cfg.url) if x.prefill)
        ttft.append(r.ttft)
        d_pre.append(r.ttft * 1e3 - model.prefill_ms([s.prompt_len]))
        front.append(r.ttft - (first.end - first.start))
        if r.tpot is not None:  # more than one output token
            tpot.append(r.tpot)
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


def isolated_profile(prof: Profile, tp: int, cal: dict) -> Profile:
    """The isolated profile with the calibration's unloaded overheads folded into its constant terms."""
    return dataclasses.replace(prof, tp={**prof.tp, tp: fold_overhead(
        prof.tp[tp], cal["overhead_prefill_ms"], cal["overhead_decode_ms"])})


def noise_draws(prof: Profile, layout: Layout, times: list[float], lengths: list[tuple[int, int]], slo: SLO,
                sched: SchedulerConfig, args) -> list[SimResult]:
    """--noise-draws simulations of one rate with the profile's step noise (seeds --seed, --seed + 1, ...),
    to be averaged."""
    return [simulate(prof, layout, times, lengths, slo, sched, seed=args.seed + k) for k in range(args.noise_draws)]


def in_server_profile(prof: Profile, tp: int, mode: str, iso: Profile,
                      records: list[StepRecord]) -> tuple[Profile, dict]:
    """The profile with this layout's coefficients, arrival stalls (and, disaggregated, interference factors)
    fitted to the server's own step trace (`records`, as held_out picks them; scheduler/planner/trace_fit.py),
    and the fitted model's residuals on that trace as its step noise; `iso` (the isolated profile) where the
    trace has too few steps the formulas describe (e.g. chunked prefill, whose steps are mostly mixed)."""
    try:
        fit = fit_trace(records, roles_of(mode))
    except ValueError as e:
        print(f"[{mode}] in-server fit impossible ({e}): the isolated profile stands in", flush=True)
        return iso, {"coeffs": None, "interference": iso.interference, "fit": {"error": str(e), "samples": None}}
    coeffs, stall = fit.coeffs, fit.arrival_stall_ms
    inter = fit.interference if mode == "disagg" else prof.interference
    # the fitted model's error on each traced step: the step-time noise the simulator draws from, as measured
    # (centred on 1 instead, it scored the same on band5 / band6's saved traces: 7 + 7 vs 6 + 8 of 20 rates)
    noise = {k: tuple(v) for k, v in residuals(records, LatencyModel(coeffs), inter, roles_of(mode), stall).items()
             if v}
    spread = {k: {q: round(float(np.quantile(v, x)), 3) for q, x in (("p10", .1), ("p50", .5), ("p90", .9))}
              | {"mean": round(statistics.fmean(v), 3)} for k, v in noise.items()}
    return dataclasses.replace(prof, tp={**prof.tp, tp: coeffs}, interference=inter, step_noise=noise,
                               arrival_stall_ms=stall), {
        "coeffs": coeffs.to_json(), "interference": fit.interference, "arrival_stall_ms": stall, "step_noise": spread,
        "fit": fit.report}


def held_out(fit_records: list[StepRecord], traces: dict[str, list[StepRecord]], rate: str) -> list[StepRecord]:
    """The steps the in-server model judged at `rate` is fitted to: the fit runs' and every other rate's, never
    the steps of the runs it is judged against. The other rates' runs add the batch shapes and the machine's
    state of the same rounds (offline on band5 / band6's saved traces: 7 + 9 of 20 rates within the bar,
    against 6 + 8 fitted on the fit runs alone)."""
    if rate not in traces:  # a key that matched nothing would let the judged runs into their own fit
        raise KeyError(f"no traces for rate {rate!r} (have {sorted(traces)})")
    return fit_records + [r for key, steps in traces.items() if key != rate for r in steps]


def run_mode(mode: str, args, specs: list[RequestSpec], fit_sets: list[list[RequestSpec]], prof: Profile) -> dict:
    flags, layout, tp = MODES[mode]
    # the server's limits (its other flags: defaults)
    sched = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_prefill_tokens=args.max_prefill_tokens)
    server_flags = ["--dtype", args.dtype, "--weights", args.weights,  # as the profile's model
                    "--log-level", "WARNING", "--max-num-seqs", str(sched.max_num_seqs),
                    "--max-prefill-tokens", str(sched.max_prefill_tokens), *flags, "--step-trace", "1000000"]
    out = Path(args.out)
    with ServerProcess(server_flags, out / f"server-{mode}.log", port=args.port or None) as server:
        url = server.url
        client = ClientConfig(url, asyncio.run(fetch_model_name(url)), progress=False, token_ids=True)  # exact lengths
        cal = calibrate(client, specs, prof, tp, args.calibration_requests)
        iso_prof = isolated_profile(prof, tp, cal)
        slo = SLO(cal["ttft_s"] * args.slo_scale, cal["tpot_s"] * args.slo_scale)
        cap = capacity(iso_prof, tp, mode, specs)
        # the in-server fit: other requests (seed + 1, + 2, ...) at a light and an overloaded rate, so the
        # traced steps span the batch shapes of the whole load range (and steps with and without a busy
        # neighbor); their steps as the server ran them. They run in every round, beside the measured rates:
        # this shared machine's speed drifts by ~10% over minutes, and a model fitted in one stretch of it
        # and judged in another measures the drift, not the simulator.
        fit_rates = [round(f * cap, 3) for f in args.fit_load]
        fit_times = [send_times(ArrivalSpec("poisson"), r, len(fs), args.seed + 1 + i)
                     for i, (r, fs) in enumerate(zip(fit_rates, fit_sets, strict=True))]
        front = cal["front_end_ttft_ms"] / 1e3
        print(f"[{mode}] unloaded TTFT {cal['ttft_s'] * 1e3:.0f} ms TPOT {cal['tpot_s'] * 1e3:.1f} ms; overhead "
              f"prefill {cal['overhead_prefill_ms']:.1f} ms decode {cal['overhead_decode_ms']:.1f} ms; front end "
              f"{front * 1e3:.1f} ms; SLO {slo.ttft * 1e3:.0f}/{slo.tpot * 1e3:.0f} ms; est. capacity {cap:.2f} "
              f"req/s; in-server fit runs at {fit_rates} req/s in every round", flush=True)
        lengths = [(s.prompt_len, s.output_len) for s in specs]
        rates = [round(frac * cap, 3) for frac in args.load]
        times = {rate: send_times(ArrivalSpec("poisson"), rate, len(specs), args.seed) for rate in rates}
        reals: dict[float, list[dict]] = {rate: [] for rate in rates}
        traces: dict[str, list[StepRecord]] = {str(rate): [] for rate in rates}
        fit_records: list[StepRecord] = []
        # Rounds over all the rates, not the repeats of one rate back to back: a drift of the machine's
        # speed during the bench then shows in every rate's spread, as it would in any later run.
        for rnd in range(args.repeats):
            for fit_specs, ft in zip(fit_sets, fit_times, strict=True):
                asyncio.run(run_load(fit_specs, ft, client))
                fit_records += steps(url)
            for rate in rates:
                real = summarize(asyncio.run(run_load(specs, times[rate], client)), slo.ttft, slo.tpot)
                reals[rate].append(real)
                traces[str(rate)] += steps(url)  # for the step ratio and OUT/traces-MODE.json
                print(f"[{mode}] round {rnd + 1}/{args.repeats}, {rate} req/s: real both "
                      f"{100 * real['attainment_both']:.1f}%", flush=True)
        rows, fits = [], []
        for frac, rate in zip(args.load, rates, strict=True):
            srv_prof, fitted = in_server_profile(prof, tp, mode, iso_prof, held_out(fit_records, traces, str(rate)))
            fits.append({"rate": rate, **fitted})
            print(f"[{mode}] in-server fit for {rate} req/s: {fitted['fit']['samples']} steps, interference "
                  f"{fitted['interference']}, arrival stall {fitted.get('arrival_stall_ms')} ms, step noise "
                  f"{fitted.get('step_noise')}", flush=True)
            iso = simulate(iso_prof, layout, times[rate], lengths, slo, sched)
            srv = noise_draws(srv_prof, layout, times[rate], lengths, slo, sched, args)
            row = compare(rate, frac, reals[rate], iso, srv, front, slo)
            row["step_ratio"] = model_ratios(traces[str(rate)], srv_prof.model_for(tp, 1), srv_prof.interference,
                                             roles_of(mode), srv_prof.arrival_stall_ms)
            rows.append(row)
            print(fmt_row(mode, row), flush=True)
    (out / f"traces-{mode}.json").write_text(json.dumps({k: [x.to_json() for x in v] for k, v in traces.items()}))
    (out / f"fit-traces-{mode}.json").write_text(json.dumps([x.to_json() for x in fit_records]))  # to re-fit offline
    return {"mode": mode, "server_flags": flags, "calibration": cal, "slo": dataclasses.asdict(slo),
            "capacity_estimate": cap, "profile_tp": tp, "in_server_fit": {"rates": fit_rates, "per_rate": fits},
            "rows": rows}


def judged(sim: SimResult, slo: SLO, front: float) -> dict[str, float]:
    """Attainment (%) of simulated requests, each TTFT plus the front-end time outside the engine."""
    ok = [r.meets(slo.ttft - front, slo.tpot) for r in sim.requests]
    n = len(ok)
    return {"ttft": 100 * sum(t for t, _ in ok) / n, "tpot": 100 * sum(p for _, p in ok) / n,
            "both": 100 * sum(t and p for t, p in ok) / n}


def compare(rate: float, frac: float, reals: list[dict], iso: SimResult, srv: list[SimResult], front: float,
            slo: SLO) -> dict:
    """One rate: the real runs' mean attainment and spread vs the in-server model (judged, the mean over its
    step-noise draws) and the isolated profile (iso). Met: |sim - real mean| <= max(2 points, the real runs'
    spread)."""
    row = {"rate": rate, "load": frac, "failed": sum(r["num_failed"] for r in reals), "runs": len(reals)}
    for name, sims, shift in (("sim", srv, front), ("iso", [iso], 0.0)):
        for key in ("ttft", "tpot", "both"):
            row[f"{name}_{key}"] = statistics.mean(judged(sim, slo, shift)[key] for sim in sims)
        reqs = [r for sim in sims for r in sim.requests]
        row[f"{name}_ttft_mean_ms"] = 1e3 * statistics.mean(r.ttft + shift for r in reqs if r.ttft is not None)
        row[f"{name}_tpot_mean_ms"] = 1e3 * statistics.mean(r.tpot for r in reqs if r.tpot is not None)
    for key in ("ttft", "tpot", "both"):
        row[f"real_{key}"] = statistics.mean(100 * r[f"attainment_{key}"] for r in reals)
    row["real_both_runs"] = [100 * r["attainment_both"] for r in reals]
    band = noise_band(row["real_both_runs"], row["sim_both"])
    row |= band
    row["iso_diff"] = row["iso_both"] - row["real_both"]
    row["within_2"] = abs(row["diff"]) <= 2.0
    row["real_ttft_mean_ms"] = statistics.mean(1e3 * (r["ttft_mean"] or 0) for r in reals)
    row["real_tpot_mean_ms"] = statistics.mean(1e3 * (r["tpot_mean"] or 0) for r in reals)
    return row


