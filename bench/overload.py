"""`make bench-overload`: the server at 3x its capacity, with a bounded admission queue.

    python -m bench.overload [--factor 3] [--seconds 120] [--max-waiting 4] [--max-waiting-tokens 512]
                             [--max-num-seqs 16] [--flood 12] [--unbounded] [--out out/overload]

1. capacity: server.py (disagg, at most --max-num-seqs decodes batched, --max-waiting requests and
   --max-waiting-tokens not decoding yet) flooded with --flood req/s: what it serves (the bound keeps it
   saturated, not swamped)
2. before: 1x capacity (open loop, Poisson) for --base-seconds; the deadlines (SLOs) are its p99 TTFT and
   TPOT unless --ttft-slo / --tpot-slo
3. overload: --factor x capacity for --seconds: the admitted requests' latency and SLO attainment next to
   step 2's, the share refused (503 + Retry-After) and how fast a refusal comes, RSS while it runs
4. --unbounded: step 3 again on a server without the bounds, for contrast
Writes OUT/overload.json; prints a markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.client import ClientConfig, fetch_model_name, run_load
from bench.common import machine, today
from bench.datasets import RequestSpec, load_dataset
from bench.metrics import MeasuredRequest, summarize
from bench.soak import rss_mib, server
from scheduler.planner.workload import ArrivalSpec, send_times


@dataclass
class Phase:
    """One stretch of open-loop load: what every client saw, and the server's RSS (MiB) meanwhile."""

    rate: float
    results: list[MeasuredRequest]
    rss: list[float]


async def phase(specs: list[RequestSpec], rate: float, seconds: float, seed: int, url: str, pid: int,
                args: argparse.Namespace, every: float = 2.0) -> Phase:
    """`rate` requests per second (Poisson) for `seconds`, cycling through specs."""
    n = max(1, int(rate * seconds))
    cfg = ClientConfig(url, await fetch_model_name(url), request_timeout=args.request_timeout, progress=False)
    rss: list[float] = []

    async def sample() -> None:
        while True:
            rss.append(rss_mib(pid))
            await asyncio.sleep(every)

    watch = asyncio.create_task(sample())
    try:
        results = await run_load((specs * (n // len(specs) + 1))[:n], send_times(ArrivalSpec("poisson"), rate, n, seed),
                                 cfg)
    finally:
        watch.cancel()
    rss.append(rss_mib(pid))
    print(f"  {n} requests at {rate:.2f}/s: {sum(r.finished for r in results)} ok, "
          f"{sum(r.error.startswith('HTTP 503') for r in results)} refused", flush=True)
    return Phase(rate, results, rss)


def judged(p: Phase, ttft_slo: float | None, tpot_slo: float | None) -> dict:
    """Summary of the admitted requests (refusals aside), the refusals, and RSS."""
    refused = [r for r in p.results if r.error.startswith("HTTP 503")]
    admitted = [r for r in p.results if not r.error.startswith("HTTP 503")]
    s = summarize(admitted, ttft_slo, tpot_slo)
    keys = ("num_requests", "num_success", "num_failed", "errors", "request_throughput", "attainment_both") + tuple(
        f"{m}_p{q}" for m in ("ttft", "tpot", "e2e") for q in (50, 90, 99))
    return {"offered_rate": p.rate, "sent": len(p.results), "refused": len(refused),
            "refused_share": len(refused) / len(p.results),
            "refusal_p99_s": float(np.percentile([r.end - r.start for r in refused], 99)) if refused else None,
            "admitted": {k: s[k] for k in keys}, "rss_mib": {"start": p.rss[0], "max": max(p.rss), "end": p.rss[-1]}}


def served_rate(p: Phase, seconds: float) -> float:
    """Completions per second during the last three quarters of a `seconds`-long flood (its ramp aside)."""
    ends = [r.end for r in p.results if r.finished and seconds / 4 <= r.end <= seconds]
    return len(ends) / (0.75 * seconds)


async def measure(args: argparse.Namespace, specs: list[RequestSpec]) -> tuple[float, dict[str, Phase]]:
    """On the bounded server: the capacity (what it serves of a flood of --flood req/s: the bound keeps it
    saturated, not swamped), then 1x of it (before), then --factor x. With --unbounded, the overload again on
    a server without bounds."""
    common = ["--mode", "disagg", "--log-level", "WARNING", "--max-num-seqs", str(args.max_num_seqs),
              *args.server_args]
    bounds = ["--max-waiting", str(args.max_waiting), "--max-waiting-tokens", str(args.max_waiting_tokens)]
    phases: dict[str, Phase] = {}
    out = Path(args.out)
    async with server(common + bounds, out / "server-bounded.log") as (url, pid):
        flood = await phase(specs, args.flood, args.calibrate_seconds, 3, url, pid, args)
        capacity = args.capacity or served_rate(flood, args.calibrate_seconds)
        print(f"capacity ~ {capacity:.2f} req/s (served of {args.flood:g} req/s offered)", flush=True)
        phases["before"] = await phase(specs, capacity, args.base_seconds, 1, url, pid, args)
        phases["bounded"] = await phase(specs, args.factor * capacity, args.seconds, 2, url, pid, args)
    if args.unbounded:
        async with server(common, out / "server-unbounded.log") as (url, pid):
            phases["unbounded"] = await phase(specs, args.factor * capacity, args.seconds, 2, url, pid, args)
    return capacity, phases


def table(doc: dict) -> str:
    rows = ["| run | offered req/s | sent | refused (503) | refusal p99 | admitted ok / failed | TTFT p50 / p99 | "
            "TPOT p50 / p99 | E2E p99 | SLO attainment | RSS start -> max MiB |", "|" + "---|" * 11]
    for name, r in doc["runs"].items():
        a = r["admitted"]
        ms = lambda x: "-" if x is None else f"{x * 1e3:.0f} ms"  # noqa: E731
        rows.append(f"| {name} | {r['offered_rate']:.2f} | {r['sent']} | {r['refused']} ({r['refused_share']:.0%}) | "
                    f"{ms(r['refusal_p99_s'])} | {a['num_success']} / {a['num_failed']} | {ms(a['ttft_p50'])} / "
                    f"{ms(a['ttft_p99'])} | {ms(a['tpot_p50'])} / {ms(a['tpot_p99'])} | {ms(a['e2e_p99'])} | "
                    f"{a['attainment_both']:.0%} | {r['rss_mib']['start']:.0f} -> {r['rss_mib']['max']:.0f} |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fixed:128:32", help="bench.datasets workload (fixed:IN:OUT)")
    p.add_argument("--factor", type=float, default=3.0, help="overload arrival rate / capacity")
    p.add_argument("--seconds", type=float, default=120.0, help="length of the overload")
    p.add_argument("--base-seconds", type=float, default=60.0, help="length of the 1x run before the overload")
    p.add_argument("--capacity", type=float, help="req/s (default: measured by the closed loop)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="the servers' decode batch bound (sized for TPOT)")
    p.add_argument("--flood", type=float, default=12.0, help="req/s offered to measure the capacity")
    p.add_argument("--calibrate-seconds", type=float, default=40.0, help="length of the flood")
    p.add_argument("--max-waiting", type=int, default=4, help="the server's bound in requests not decoding yet")
    p.add_argument("--max-waiting-tokens", type=int, default=512, help="... and in their prompt tokens")
    p.add_argument("--ttft-slo", type=float, help="seconds (default: the p99 of the 1x run)")
    p.add_argument("--tpot-slo", type=float, help="seconds (default: the p99 of the 1x run)")
    p.add_argument("--unbounded", action="store_true", help="also run the overload with no bound")
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--out", default="out/overload")
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="the rest goes to server.py")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engine.loader import load_tokenizer

    specs = load_dataset(args.dataset, load_tokenizer(None), 512, seed=0)
    doc: dict = {"date": today(), "machine": machine(), "command": " ".join(sys.argv), "dataset": args.dataset,
                 "factor": args.factor, "seconds": args.seconds}
    doc["capacity"], phases = asyncio.run(measure(args, specs))
    base = summarize([r for r in phases["before"].results if r.finished], None, None)
    slo = {"ttft": args.ttft_slo or base["ttft_p99"], "tpot": args.tpot_slo or base["tpot_p99"]}
    names = {"before": "1x, bounded (before)", "bounded": f"{args.factor:g}x, bounded",
             "unbounded": f"{args.factor:g}x, unbounded"}
    doc["slo"], doc["bounds"] = slo, {"max_waiting": args.max_waiting, "max_waiting_tokens": args.max_waiting_tokens}
    doc["runs"] = {names[k]: judged(p, slo["ttft"], slo["tpot"]) for k, p in phases.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overload.json").write_text(json.dumps(doc, indent=1))
    print(f"\nSLOs: TTFT {slo['ttft'] * 1e3:.0f} ms, TPOT {slo['tpot'] * 1e3:.0f} ms\n{table(doc)}")
    print(f"written {out / 'overload.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
