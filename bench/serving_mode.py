"""One mode of `make bench-serving` (bench/serving_compare.py): its server, warm-up, unloaded latency,
the rate sweep through the load tester, the goodput refinement, and the per-rate server-side breakdown.
Measurements wait for the shared machine to be quiet and record what other processes used meanwhile."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import aiohttp

from bench import loadgen
from bench.client import ClientConfig, fetch_model_name, run_load
from bench.datasets import RequestSpec
from bench.runner import run_rate, write_run
from bench.server_process import ServerProcess
from bench.serving_report import (
    CpuSample,
    Mode,
    ModeResult,
    Slos,
    breakdown,
    derive_slos,
    other_cores,
    parse_metrics,
    pid_cpu,
    proc_stat_busy,
)
from scheduler.planner.goodput_search import GoodputSearch, SearchConfig

# ---- the server and the machine ----------------------------------------------------------------


def server(mode: Mode, args: argparse.Namespace, log: Path) -> ServerProcess:
    """The mode's server.py (not started): its layout flags plus the comparison's common ones."""
    flags = [*mode.server_args, "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs),
             "--log-level", "WARNING"]  # fmt: skip
    return ServerProcess(flags, log, startup_timeout=args.startup_timeout)


def cpu(srv: ServerProcess) -> CpuSample:
    """Machine-wide busy CPU and this benchmark's share: this process, the server and every process under it
    (with --cluster ray its raylet and the instances' actors)."""
    import psutil

    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        busy = proc_stat_busy(f.readline(), hz)
    ours = 0.0
    pids = [os.getpid()]
    if srv.proc:
        try:
            pids += [srv.proc.pid, *(c.pid for c in psutil.Process(srv.proc.pid).children(recursive=True))]
        except psutil.Error:
            pass
    for pid in pids:
        try:
            ours += pid_cpu(Path(f"/proc/{pid}/stat").read_text(), hz) if pid else 0.0
        except OSError:
            pass
    return CpuSample(time.monotonic(), busy, ours)


async def quiet(srv: ServerProcess, below: float, max_wait: float) -> None:
    """Waits (up to max_wait s) for other processes to leave the CPU, so modes are measured alike."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        a = cpu(srv)
        await asyncio.sleep(2.0)
        if (other_cores(a, cpu(srv)) or 0.0) < below:
            return


async def metrics(srv: ServerProcess) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(f"{srv.url}/metrics") as r:
        return parse_metrics(await r.text())


# ---- the measurements --------------------------------------------------------------------------


async def sequential(specs: list[RequestSpec], client: ClientConfig) -> tuple[list[float], list[float]]:
    """Sends specs one at a time (unloaded); returns their TTFTs and TPOTs. Any failure is fatal here."""
    one = ClientConfig(client.url, client.model, request_timeout=client.request_timeout, max_concurrency=1,
                       progress=False, token_ids=client.token_ids)  # fmt: skip
    results = await run_load(specs, [0.0] * len(specs), one)
    bad = [r.error for r in results if not r.finished]
    if bad:
        raise RuntimeError(f"unloaded requests failed: {bad[:3]}")
    return [r.ttft for r in results], [r.tpot for r in results if r.tpot is not None]  # type: ignore[misc]


async def run_mode(mode: Mode, specs: list[RequestSpec], probes: list[RequestSpec], slos: Slos | None,
                   args: argparse.Namespace, meta0: dict) -> tuple[ModeResult, Slos]:  # fmt: skip
    out = Path(args.out) / mode.name
    shutil.rmtree(out, ignore_errors=True)  # stale rate files would join this run's curves
    label = f"{mode.name}-{meta0['workload']}"
    async with server(mode, args, out / "server.log") as srv:
        model = await fetch_model_name(srv.url)
        meta0.setdefault("model", model)
        # token ids: our own server, exact prompt lengths
        client = ClientConfig(srv.url, model, request_timeout=args.request_timeout, progress=False, token_ids=True)
        await sequential(probes[: args.warmup], client)  # warm-up: first-call allocations, kernel choice
        await quiet(srv, args.quiet_below, args.quiet_wait)
        cpu0 = cpu(srv)
        ttfts, tpots = await sequential(probes, client)
        others = other_cores(cpu0, cpu(srv))
        if slos is None:
            how = (f"{mode.name} server, {len(probes)} requests one at a time, "
                   f"prompt {probes[0].prompt_len} / output {probes[0].output_len} tokens")
            slos = derive_slos(ttfts, tpots, args.ttft_scale, args.tpot_scale, how)
            print(slos.describe(), flush=True)
        result = ModeResult(mode, 0.0, {}, unloaded_ttft=sum(ttfts) / len(ttfts),
                            unloaded_tpot=sum(tpots) / len(tpots), breakdown={}, unloaded_other_cores=others)
        print(f"[{mode.name}] unloaded TTFT {result.unloaded_ttft:.3f} s, TPOT {1000 * result.unloaded_tpot:.1f} ms "
              f"(other processes: {others or 0:.2f} cores)", flush=True)  # fmt: skip
        # The load tester's own argument set and output (results-*.json, summary.json, its plots).
        largs = loadgen.build_parser().parse_args([
            "--out", str(out), "--label", label, "--dataset", "sharegpt", "--num-requests", str(len(specs)),
            "--ttft-slo", str(slos.ttft), "--tpot-slo", str(slos.tpot), "--attainment", str(args.attainment),
            "--seed", str(args.seed), "--num-gpus", str(mode.cores), "--find-goodput",
        ])  # fmt: skip
        meta = {**meta0, "label": label, "url": srv.url, "model": model, "num_requests": len(specs),
                "arrival": str(largs.arrival), "seed": args.seed, "ttft_slo": slos.ttft, "tpot_slo": slos.tpot,
                "attainment_target": args.attainment, "num_gpus": mode.cores, "mode": mode.name,
                "server_args": list(mode.server_args), "slos": slos.describe()}  # fmt: skip
        state = loadgen.State()

        async def measure(rate: float) -> float:
            await quiet(srv, args.quiet_below, args.quiet_wait)
            before, cpu0 = await metrics(srv), cpu(srv)
            run = await run_rate(specs, rate, client, largs.arrival, args.seed, slos.ttft, slos.tpot)
            b = breakdown(before, await metrics(srv))
            b["other_cores"] = other_cores(cpu0, cpu(srv))
            result.breakdown[rate] = b  # type: ignore[index]
            state.runs.append(run)
            write_run(out, label, run, meta)
            s = run.summary
            result.runs[rate] = s
            print(f"[{mode.name}] rate {rate:g}/s: attainment TTFT {s['attainment_ttft']:.0%} TPOT "
                  f"{s['attainment_tpot']:.0%} both {s['attainment_both']:.0%}; P90 TTFT {s['ttft_p90'] or 0:.2f} s "
                  f"TPOT {1000 * (s['tpot_p90'] or 0):.0f} ms, {s['num_failed']} failed; other processes "
                  f"{b['other_cores'] or 0:.2f} cores", flush=True)  # fmt: skip
            return s["attainment_both"]

        sweep: list[tuple[float, float]] = []
        for rate in sorted(args.rates):
            sweep.append((rate, await measure(rate)))
            if sweep[-1][1] < args.skip_below:  # far past capacity: higher rates only cost time
                print(f"[{mode.name}] skipping rates above {rate:g}/s (joint attainment < {args.skip_below:.0%})")
                break
        # The load tester's search, seeded with the sweep, gets exactly --refine more probes.
        # No probe below the sweep's lowest rate: a slower one costs N / rate seconds.
        cfg = SearchConfig(target=args.attainment, max_iterations=len(sweep) + args.refine,
                           requests_per_probe=len(specs), min_rate=0.99 * min(args.rates))  # fmt: skip
        search = GoodputSearch(cfg)
        for rate, att in sweep:
            search.record(rate, att)
        while (rate := search.next_rate()) is not None:  # bisection between the sweep's pass and fail
            search.record(rate, await measure(rate))
        state.search = search.result()
        result.goodput = state.search.goodput
        loadgen.finish(largs, meta, state)
    (out / "breakdown.json").write_text(json.dumps({f"{k:g}": v for k, v in result.breakdown.items()}, indent=1))
    return result, slos
