"""Ray actors vs in-process threads, the same disagg layout, interleaved: goodput per core of each.

    python -m bench.cluster_compare [--rates 0.1,0.3,0.6] [--rounds 2] [--ttft-slo 3.167 --tpot-slo 0.1947]

Both servers are up at once (prefill on one core, decode on the other; `--cluster ray` makes each instance an
actor), and every rate is measured in rounds A B, B A, ... with the same requests and send times, so that the
machine's other load (it is shared) falls on both alike; an idle server uses no CPU. A mode's attainment at a
rate is over all its rounds; its goodput is the highest rate at which it and every lower rate reach the target.
The workload and SLOs are bench.serving_compare's (ShareGPT, prompts capped to 256 tokens, outputs to 32).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from contextlib import AsyncExitStack
from datetime import datetime
from pathlib import Path

from bench.client import ClientConfig, fetch_model_name
from bench.datasets import load_dataset
from bench.runner import run_rate
from bench.serving_compare import machine
from bench.serving_mode import cpu, sequential, server
from bench.serving_report import cap_specs, layouts, other_cores, probe_specs
from scheduler.planner.goodput_search import GoodputSearch, SearchConfig
from scheduler.planner.workload import ArrivalSpec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.cluster_compare", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--rates", default="0.1,0.3,0.6", help="req/s, comma-separated")
    a("--rounds", type=int, default=2, help="runs per mode and rate (alternating which goes first)")
    a("--num-requests", type=int, default=12)
    a("--max-prompt", type=int, default=256)
    a("--max-output", type=int, default=32)
    a("--ttft-slo", type=float, default=3.167, help="seconds (default: bench/results/serving-cpu's quick run)")
    a("--tpot-slo", type=float, default=0.1947, help="seconds")
    a("--attainment", type=float, default=0.9)
    a("--seed", type=int, default=0)
    a("--dtype", default="float32")
    a("--max-num-seqs", type=int, default=64)
    a("--kv-total-mib", type=int, default=1024)
    a("--out", default="bench/out/cluster-compare")
    a("--startup-timeout", type=float, default=300.0)
    a("--request-timeout", type=float, default=300.0)
    return p


async def amain(args: argparse.Namespace, cmd: str) -> int:
    from engine.loader import load_tokenizer

    tok = load_tokenizer(None)
    specs = cap_specs(load_dataset("sharegpt", tok, args.num_requests, args.seed), args.max_prompt, args.max_output,
                      tok)
    modes = [m for m in layouts(sorted(os.sched_getaffinity(0)), args.kv_total_mib, [1], ray=True)
             if m.name.startswith("disagg")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rates = [float(r) for r in args.rates.split(",")]
    runs: dict[str, dict[float, list[dict]]] = {m.name: {r: [] for r in rates} for m in modes}
    async with AsyncExitStack() as stack:
        servers, clients = {}, {}
        for m in modes:
            srv = await stack.enter_async_context(server(m, args, out / f"{m.name}-server.log"))
            model = await fetch_model_name(srv.url)
            clients[m.name] = ClientConfig(srv.url, model, request_timeout=args.request_timeout, progress=False,
                                           token_ids=True)
            servers[m.name] = srv
            await sequential(probe_specs(specs, 2, tok), clients[m.name])  # warm-up
        for rate in rates:
            for rnd in range(args.rounds):
                for m in modes if rnd % 2 == 0 else modes[::-1]:
                    srv = servers[m.name]
                    before = cpu(srv)
                    run = await run_rate(specs, rate, clients[m.name], ArrivalSpec("poisson"), args.seed,
                                         args.ttft_slo, args.tpot_slo)
                    s = {k: run.summary[k] for k in ("attainment_both", "ttft_p90", "tpot_p90", "num_failed")}
                    s["other_cores"] = other_cores(before, cpu(srv))
                    runs[m.name][rate].append(s)
                    print(f"[{m.name}] rate {rate:g} round {rnd}: attainment {s['attainment_both']:.0%}, P90 TTFT "
                          f"{s['ttft_p90'] or 0:.2f} s TPOT {1000 * (s['tpot_p90'] or 0):.0f} ms, other processes "
                          f"{s['other_cores'] or 0:.2f} cores", flush=True)
    rows = []
    for m in modes:
        search = GoodputSearch(SearchConfig(target=args.attainment))  # the one goodput rule (every lower rate passes)
        for rate in rates:
            search.record(rate, sum(r["attainment_both"] for r in runs[m.name][rate]) / args.rounds)
        rows.append((m, search.result().goodput))
    date = datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [f"# Ray actors vs threads, disagg 1P+1D, interleaved ({date}; {machine()})", "", f"Command: `{cmd}`",
             f"SLOs TTFT {args.ttft_slo} s, TPOT {args.tpot_slo} s, target {args.attainment:.0%}; {len(specs)} "
             f"ShareGPT requests per run, prompts <= {args.max_prompt}, outputs <= {args.max_output} tokens", "",
             "| mode | " + " | ".join(f"attainment @ {r:g}/s" for r in rates) + " | goodput (req/s) | per core |",
             "|---|" + "---:|" * (len(rates) + 2)]
    for m, goodput in rows:
        atts = [sum(r["attainment_both"] for r in runs[m.name][rate]) / args.rounds for rate in rates]
        lines.append(f"| {m.name} | " + " | ".join(f"{a:.0%}" for a in atts) + f" | {goodput:g} | "
                     f"{goodput / m.cores:.3f} |")
    others = [r["other_cores"] or 0 for m in modes for rate in rates for r in runs[m.name][rate]]
    lines += ["", f"Other processes during the runs: {min(others):.2f}-{max(others):.2f} cores (mean "
              f"{sum(others) / len(others):.2f})."]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    (out / "runs.json").write_text(json.dumps({k: {f"{r:g}": v for r, v in d.items()} for k, d in runs.items()},
                                              indent=1))
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    return asyncio.run(amain(args, " ".join(["python -m bench.cluster_compare", *argv])))


if __name__ == "__main__":
    sys.exit(main())
