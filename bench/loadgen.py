"""Load tester: TTFT / TPOT attainment and goodput of any OpenAI-compatible streaming server.

CLI
  python -m bench.loadgen --url http://127.0.0.1:8000 --dataset sharegpt|humaneval|longbench-synthetic|fixed:IN:OUT
      --num-requests N (--rate R | --rates R1,R2,... | --find-goodput) --arrival poisson|gamma:CV|fixed
      --ttft-slo S --tpot-slo S [--attainment 0.9] [--seed 0] [--out DIR] [--slo-scale 0.5,1,2]
      [--endpoint completions|chat] [--tokenizer GGUF_OR_HF_DIR] [--token-ids]
  python -m bench.loadgen --plot-only DIR_OR_JSON... [--out X.png]     (same as python -m bench.plots)
Prompts are sent as text (any OpenAI-compatible server takes it: ours, vLLM, llama.cpp's llama-server,
guidellm's mock), built so that the tokenizer (--tokenizer: the target model's; default the bundled SmolLM2)
counts exactly the dataset's lengths; --token-ids sends the token ids instead (completions only).
Writes DIR/results-<label>-rate<R>.json (every request's timings + summary), DIR/summary.json,
DIR/attainment-vs-rate.png, DIR/latency-cdf.png and, with --slo-scale, DIR/attainment-vs-slo-scale.png
(DIR: out/loadgen by default). Ctrl-C stops the run and writes what was measured so far (exit status 130).
CPU-sized (2 cores, SmolLM2, ~1 minute): --dataset fixed:64:32 --num-requests 20 --rate 1 --ttft-slo 2 --tpot-slo 0.2

Python API (what `make bench-serving` and the simulator-fidelity benchmark call)
  bench.datasets.load_dataset(name, tokenizer, num, seed, max_model_len, cache_dir) -> list[RequestSpec]
      RequestSpec(prompt_ids, prompt_text, prompt_len, output_len)
  scheduler.planner.workload.send_times(ArrivalSpec.parse("poisson"), rate, n, seed) -> list[float]
  await bench.client.run_load(specs, send_times, ClientConfig(url, model, ...)) -> list[MeasuredRequest]
  await bench.runner.run_rate(specs, rate, client_cfg, arrival, seed, ttft_slo, tpot_slo) -> Run(results, summary)
  bench.metrics.summarize(results, ttft_slo, tpot_slo) -> dict   (p50/p90/p99, throughput, attainment_*)
  bench.metrics.attainment / slo_scale_attainment(results, ttft_slo, tpot_slo, scales)
  scheduler.planner.goodput_search.find_goodput(measure_sync, SearchConfig) / find_goodput_async(measure_async, cfg)
      measure(rate) -> joint attainment; returns SearchResult(goodput, history, stop_reason)
  bench.plots.plot_attainment_vs_rate / plot_latency_cdf / plot_slo_scale / load_runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.client import ClientConfig, fetch_model_name
from bench.datasets import RequestSpec, is_synthetic, load_dataset
from bench.metrics import MeasuredRequest, slo_scale_attainment, summarize
from bench.runner import Run, format_table, run_rate, write_run
from scheduler.planner.goodput_search import SearchConfig, SearchResult, find_goodput_async
from scheduler.planner.workload import ArrivalSpec


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--dataset", default="sharegpt", help="sharegpt | humaneval | longbench-synthetic | fixed:IN:OUT")
    p.add_argument("--num-requests", type=int, default=100)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rate", type=float, help="requests per second")
    g.add_argument("--rates", type=_floats, help="comma-separated rates, one run each")
    g.add_argument("--find-goodput", action="store_true", help="search the highest rate meeting --attainment")
    p.add_argument("--arrival", default="poisson", type=ArrivalSpec.parse, help="poisson | gamma:CV | fixed")
    p.add_argument("--ttft-slo", type=float, help="seconds; unset: unconstrained")
    p.add_argument("--tpot-slo", type=float, help="seconds; unset: unconstrained")
    p.add_argument("--attainment", type=float, default=0.9, help="target share meeting both SLOs")
    p.add_argument("--slo-scale", type=_floats, default=[], help="e.g. 0.5,1,2: attainment at scaled SLOs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/loadgen", help="output directory (a .png path with --plot-only)")
    p.add_argument("--label", help="name of this configuration in files and plots (default: the dataset)")
    p.add_argument("--model", help="default: the first model of GET /v1/models")
    p.add_argument("--api-key")
    p.add_argument("--tokenizer", help="the target model's tokenizer, a GGUF file or HF directory: prompt "
                   "lengths are counted with it (default: the bundled SmolLM2's)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--cache-dir", help="processed-dataset cache (default ~/.cache/distserve-bench)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="POST /v1/completions, or /v1/chat/completions with the prompt as one user message "
                   "(the server's chat template adds its own tokens)")
    p.add_argument("--token-ids", action="store_true",
                   help="send prompts as token ids (exact lengths; completions only, and not every server takes them)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--max-concurrency", type=int, help="cap on requests in flight (default: open loop)")
    p.add_argument("--num-gpus", type=int, default=1, help="for per-GPU goodput")
    p.add_argument("--search-start", type=float, default=1.0, help="first rate of the doubling search")
    p.add_argument("--search-lo", type=float, help="a rate believed to meet the target (probed first)")
    p.add_argument("--search-hi", type=float, help="a rate taken as failing: caps the search")
    p.add_argument("--search-tol", type=float, default=0.05, help="stop when (hi - lo) <= tol * hi")
    p.add_argument("--max-search-iterations", type=int, default=10)
    p.add_argument("--max-search-seconds", type=float, default=1800.0)
    p.add_argument("--max-search-requests", type=int, help="total requests over all search runs")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--plot-only", nargs="+", metavar="PATH", help="plot result files/dirs and exit")
    return p


@dataclass
class State:
    """What has been measured; survives a Ctrl-C so it can be written."""

    runs: list[Run] = field(default_factory=list)
    sink: list[MeasuredRequest] = field(default_factory=list)  # finished requests of the run in progress
    current_rate: float | None = None
    search: SearchResult | None = None
    interrupted: bool = False


async def _measure(args, specs, client: ClientConfig, state: State, meta: dict, rate: float) -> float:
    state.sink, state.current_rate = [], rate
    run = await run_rate(specs, rate, client, args.arrival, args.seed, args.ttft_slo, args.tpot_slo, state.sink)
    state.current_rate = None
    state.runs.append(run)
    write_run(Path(args.out), meta["label"], run, meta)
    s = run.summary
    print(f"rate {rate:.4g}/s: attainment TTFT {s['attainment_ttft']:.1%} TPOT {s['attainment_tpot']:.1%} "
          f"both {s['attainment_both']:.1%}, {s['num_failed']} failed", flush=True)  # fmt: skip
    return s["attainment_both"]


async def drive(args, specs: list[RequestSpec], meta: dict, state: State) -> None:
    """Runs the requested rates or search; on cancellation (Ctrl-C) returns with state.interrupted set."""
    try:
        if not args.model:
            try:
                args.model = await fetch_model_name(args.url, args.api_key)
            except Exception as e:  # the runs will record the failures; do not die here
                print(f"warning: GET /v1/models failed ({e}); sending model=''", file=sys.stderr)
                args.model = ""
        meta["model"] = args.model
        client = ClientConfig(
            args.url, args.model, args.api_key, args.request_timeout, args.token_ids,
            args.max_concurrency, progress=not args.no_progress, endpoint=args.endpoint,
        )  # fmt: skip
        if args.find_goodput:
            cfg = SearchConfig(
                target=args.attainment, start_rate=args.search_start, lo=args.search_lo, hi=args.search_hi,
                rel_tol=args.search_tol, max_iterations=args.max_search_iterations,
                max_seconds=args.max_search_seconds, max_requests=args.max_search_requests,
                requests_per_probe=len(specs),
            )  # fmt: skip
            state.search = await find_goodput_async(lambda r: _measure(args, specs, client, state, meta, r), cfg)
        else:
            for rate in args.rates or [args.rate]:
                await _measure(args, specs, client, state, meta, rate)
    except asyncio.CancelledError:
        state.interrupted = True


def finish(args, meta: dict, state: State) -> dict:
    """Writes the partial run (if any), summary.json and the plots; prints the table."""
    out = Path(args.out)
    if state.interrupted and state.current_rate is not None and state.sink:
        results = sorted(state.sink, key=lambda r: r.index)
        run = Run(state.current_rate, results, summarize(results, args.ttft_slo, args.tpot_slo), partial=True)
        state.runs.append(run)
        write_run(out, meta["label"], run, meta)
    target = args.attainment
    passing = [r.rate for r in state.runs if not r.partial and r.summary["attainment_both"] >= target]
    doc = {
        **meta,
        "interrupted": state.interrupted,
        "runs": [{"rate": r.rate, "file": r.file, "partial": r.partial, **r.summary} for r in state.runs],
        "best_measured_rate_meeting_target": max(passing, default=None),
    }
    if state.search is not None:
        g = state.search.goodput
        doc["goodput"] = g
        doc["goodput_per_gpu"] = g / args.num_gpus
        doc["search"] = {"history": state.search.history, "stop_reason": state.search.stop_reason,
                         "lo": state.search.lo, "hi": state.search.hi}  # fmt: skip
    if args.slo_scale and args.ttft_slo is not None and args.tpot_slo is not None:
        doc["slo_scale"] = [
            {"rate": r.rate, **a}
            for r in state.runs
            for a in slo_scale_attainment(r.results, args.ttft_slo, args.tpot_slo, args.slo_scale)
        ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(doc, indent=1))
    title = f"{meta['label']}: dataset {meta['dataset']}" + (" (SYNTHETIC workload)" if meta["synthetic"] else "")
    slo = lambda x: "none" if x is None else f"{x:g} s ({x * 1000:g} ms)"  # noqa: E731
    title += f", SLO TTFT {slo(args.ttft_slo)} / TPOT {slo(args.tpot_slo)}, target {target:.0%}"
    print(format_table(sorted(state.runs, key=lambda r: r.rate), title))
    if state.search is not None:
        print(f"goodput: {state.search.goodput:.4g} req/s ({doc['goodput_per_gpu']:.4g} per GPU), "
              f"search stopped: {state.search.stop_reason}")  # fmt: skip
    if not args.no_plots and state.runs:
        from bench.plots import plot_run_dir

        plot_run_dir(out, doc, state.runs)
    print(f"results in {out}/")
    return doc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot_only:
        from bench.plots import main as plots_main

        out = args.out if args.out.endswith(".png") else "attainment-vs-rate.png"
        return plots_main([*args.plot_only, "--out", out])
    if args.rate is None and not args.rates and not args.find_goodput:
        build_parser().error("one of --rate, --rates, --find-goodput is required")
    if args.find_goodput and args.ttft_slo is None and args.tpot_slo is None:
        build_parser().error("--find-goodput needs --ttft-slo and/or --tpot-slo")
    if args.token_ids and args.endpoint == "chat":
        build_parser().error("--token-ids needs --endpoint completions (chat messages are text)")
    from engine.loader import load_tokenizer  # lazy: the model's tokenizer, only when a run needs it

    tokenizer = load_tokenizer(args.tokenizer)
    specs = load_dataset(args.dataset, tokenizer, args.num_requests, args.seed, args.max_model_len, args.cache_dir)
    synthetic = is_synthetic(args.dataset)
    label = args.label or args.dataset.replace(":", "-")
    meta = {
        "label": label, "dataset": args.dataset, "synthetic": synthetic, "url": args.url,
        "num_requests": len(specs), "arrival": str(args.arrival), "seed": args.seed,
        "ttft_slo": args.ttft_slo, "tpot_slo": args.tpot_slo, "attainment_target": args.attainment,
        "max_model_len": args.max_model_len, "endpoint": args.endpoint, "token_ids": args.token_ids,
        "tokenizer": args.tokenizer or "bundled SmolLM2", "num_gpus": args.num_gpus,
    }  # fmt: skip
    state = State()
    try:
        asyncio.run(drive(args, specs, meta, state))
    except KeyboardInterrupt:  # a Ctrl-C that landed outside the event loop's handler
        state.interrupted = True
    finish(args, meta, state)
    return 130 if state.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
