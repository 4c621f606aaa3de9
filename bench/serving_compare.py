"""`make bench-serving`: disaggregated vs colocated vs chunked-prefill serving on this machine.

    python -m bench.serving_compare [--quick] [--rates 0.5,1,...] [--ttft-scale 5 --tpot-scale 3] ...

For each mode (bench.serving_report.layouts: colocated on all cores, colocated + chunked prefill, and
one disagg layout per prefill/decode core split) it starts server.py on a free port, waits for
/health, warms up, measures unloaded latency (a few requests one at a time), then sweeps the same
request rates with the same requests and arrival times, refines the goodput by bisection, and stops
the server (SIGTERM). The workload is a ShareGPT sample with prompts capped to --max-prompt tokens
and outputs to --max-output tokens (CPU prefill is ~1 s per 768 tokens), named in every label.
SLOs = scale x the unloaded mean TTFT / TPOT on the colocated server (the first mode), the same for
every mode. Writes OUT/<mode>/ (the load tester's own files), OUT/attainment-vs-rate.png,
OUT/latency-cdf.png (all modes at the reference rate), OUT/summary.md; copies those to --results-dir.
One mode's run is bench/serving_mode.py; layouts, SLOs and tables are bench/serving_report.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from datetime import datetime
from pathlib import Path

from bench.datasets import load_dataset
from bench.serving_mode import run_mode
from bench.serving_report import (
    BASELINE,
    ModeResult,
    Slos,
    breakdown_table,
    cap_specs,
    layouts,
    markdown_table,
    probe_specs,
    reference_rate,
    workload_tag,
)

# Run sizes: the full run is ~30 min on 2 cores, --quick ~5-8 min.
# Rates sized for this 2-core CPU: a 256-token prefill takes ~1-1.5 s here, so one core saturates near
# 0.5 req/s of prefill work; the first full run (512/64 caps, 0.25-1.25 req/s) was already past every
# mode's goodput at its lowest rate.
FULL = {"num_requests": 32, "rates": [0.1, 0.15, 0.2, 0.3, 0.4], "refine": 1, "probes": 4, "warmup": 3}
QUICK = {"num_requests": 20, "rates": [0.1, 0.2, 0.3], "refine": 0, "probes": 2, "warmup": 2}


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serving_compare", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--quick", action="store_true", help="~5-8 min: fewer requests and rates, no refinement")
    a("--out", default="bench/out/serving")
    a("--results-dir", default="bench/results", help="where the PNGs and summary.md are copied (committed)")
    a("--num-requests", type=int, help=f"requests per rate (default {FULL['num_requests']})")
    a("--rates", type=_floats, help=f"the sweep, req/s, same for every mode (default {FULL['rates']})")
    a("--refine", type=int, help=f"bisection probes after the sweep, per mode (default {FULL['refine']})")
    a("--skip-below", type=float, default=0.5, help="skip higher sweep rates once joint attainment < this")
    a("--max-prompt", type=int, default=256, help="prompt cap, tokens")
    a("--max-output", type=int, default=32, help="output cap, tokens")
    a("--ttft-scale", type=float, default=5.0, help="TTFT SLO = this x unloaded mean TTFT")
    a("--tpot-scale", type=float, default=3.0, help="TPOT SLO = this x unloaded mean TPOT")
    a("--ttft-slo", type=float, help="seconds; skips the derivation (with --tpot-slo)")
    a("--tpot-slo", type=float, help="seconds")
    a("--probes", type=int, help=f"unloaded requests (one at a time) per mode (default {FULL['probes']})")
    a("--warmup", type=int, help=f"warm-up requests per server (default {FULL['warmup']})")
    a("--attainment", type=float, default=0.9)
    a("--seed", type=int, default=0)
    a("--modes", help="comma-separated mode names, run in that order (colocated first for derived SLOs); the Ray "
      "variants (disagg-1p1d-ray: --cluster ray) and the native-decode ones (disagg-1p1d-native-decode: "
      "--decode-weights native) run only when named")
    a("--disagg-splits", type=lambda t: [int(x) for x in t.split(",")], help="prefill core counts (default: all)")
    a("--kv-total-mib", type=int, default=1024, help="KV budget per mode, split across its instances")
    a("--max-num-seqs", type=int, default=64)
    a("--dtype", default="float32")
    a("--quiet-below", type=float, default=0.3, help="before each measurement wait until other processes use "
      "fewer cores than this (the machine is shared) ...")
    a("--quiet-wait", type=float, default=30.0, help="... for at most this many seconds")
    a("--startup-timeout", type=float, default=300.0)
    a("--request-timeout", type=float, default=300.0)
    return p


def apply_defaults(args: argparse.Namespace) -> None:
    """Unset run-size flags take the full or the --quick defaults."""
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# ---- the comparison ----------------------------------------------------------------------------


def write_outputs(results: list[ModeResult], slos: Slos, args: argparse.Namespace, meta: dict, cmd: str) -> str:
    from bench.plots import load_runs, plot_attainment_vs_rate, plot_latency_cdf

    out, tag = Path(args.out), meta["workload"]
    curves, groups = {}, {}
    ref = reference_rate(results, args.attainment)
    for r in results:
        for label, pts in load_runs([out / r.mode.name]).items():
            curves[label] = [(rate, s) for rate, s, _ in pts]
            groups.update({f"{r.mode.name} @ {rate:g}/s": reqs for rate, _, reqs in pts if rate == ref})
    plot_attainment_vs_rate(curves, out / "attainment-vs-rate.png", args.attainment)
    if groups:
        plot_latency_cdf(groups, out / "latency-cdf.png")
    cores = max(r.mode.cores for r in results)
    best = max((r for r in results if r.mode.name.startswith("disagg")), key=lambda r: r.per_core, default=None)
    base = next((r for r in results if r.mode.name == BASELINE), None)
    verdict = ""
    if best and base and base.per_core > 0:
        ratio = best.per_core / base.per_core
        verdict = (f"Best disaggregated layout ({best.mode.name}): {ratio:.2f}x the colocated goodput per core "
                   f"({'meets' if ratio >= 1.5 else 'does NOT meet'} the 1.5x aim).")  # fmt: skip
    elif best and base:
        verdict = "Colocated goodput is 0 at these SLOs: no ratio."
    unloaded = "\n".join(f"- {r.mode.name}: TTFT {r.unloaded_ttft:.3f} s, TPOT {1000 * r.unloaded_tpot:.1f} ms "
                         f"(other processes meanwhile: {r.unloaded_other_cores or 0:.2f} cores)"
                         for r in results)  # fmt: skip
    md = f"""# Serving comparison: disaggregated vs colocated vs chunked prefill ({tag})

- Date: {meta['date']}; machine: {meta['machine']}; {cores} cores; dtype {args.dtype}; model {meta.get('model', '?')}
- Command: `{cmd}`
- Workload **{tag}**: {meta['workload_desc']}
- Arrivals: Poisson, seed {args.seed}, the same requests and send times for every mode at each rate.
- SLOs (same for all modes): {slos.describe()}. Attainment target {args.attainment:.0%} of requests meeting both.
- Goodput: highest measured rate meeting the target (sweep {', '.join(f'{x:g}' for x in args.rates)} req/s,
  then {args.refine} bisection probes per mode; rates above one with joint attainment < {args.skip_below:.0%} skipped).

## Goodput

{markdown_table(results, ref)}

{verdict}

## Unloaded latency (mean prompt {meta['probe_prompt']} tokens, output {meta['probe_output']} tokens, one at a time)

{unloaded}

## Per-rate breakdown (server-side means from GET /metrics; client P90s)

Prefill = server TTFT - queueing (the prefill batch, plus in colocated modes waiting for the step it
shares with decodes). "Other processes" = CPU cores' worth used by processes outside this benchmark
during the run (the machine is shared): non-zero values mean the run competed for the 2 cores.

{breakdown_table(results)}

Plots: attainment-vs-rate.png (all modes), latency-cdf.png (all modes at {ref if ref is not None else '-'} req/s).
"""
    (out / "summary.md").write_text(md)
    dst = Path(args.results_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("attainment-vs-rate.png", "latency-cdf.png", "summary.md"):
        if (out / name).exists():
            shutil.copy(out / name, dst / f"serving-{'quick-' if args.quick else ''}{name}")
    return md


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    flags = open("/proc/cpuinfo").read()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, {isa}"


async def amain(args: argparse.Namespace, cmd: str) -> int:
    from engine.loader import load_tokenizer

    tok = load_tokenizer(None)
    raw = load_dataset("sharegpt", tok, args.num_requests, args.seed)
    specs = cap_specs(raw, args.max_prompt, args.max_output, tok)
    probes = probe_specs(specs, args.probes, tok)
    n = len(specs)
    mp, mo = sum(s.prompt_len for s in specs) / n, sum(s.output_len for s in specs) / n
    tag = workload_tag(args.max_prompt, args.max_output)
    desc = (f"{n} ShareGPT requests (DistServe preprocessing, SmolLM2 tokenizer, seed {args.seed}); prompts capped to "
            f"their last {args.max_prompt} tokens, outputs to {args.max_output} tokens (ignore_eos); mean prompt "
            f"{mp:.0f} (uncapped {sum(s.prompt_len for s in raw) / n:.0f}), mean output {mo:.0f} "
            f"(uncapped {sum(s.output_len for s in raw) / n:.0f})")  # fmt: skip
    print(f"workload {tag}: {desc}", flush=True)
    meta = {"workload": tag, "workload_desc": desc, "dataset": tag, "synthetic": False, "max_model_len": 2048,
            "token_ids": True, "date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine(), "probe_prompt": probes[0].prompt_len,
            "probe_output": probes[0].output_len}  # fmt: skip
    keep = args.modes.split(",") if args.modes else None
    modes = layouts(sorted(os.sched_getaffinity(0)), args.kv_total_mib, args.disagg_splits,
                    ray=any(m.endswith("-ray") for m in keep or ()),
                    native_decode=any(m.endswith("-native-decode") for m in keep or ()))
    if keep:  # in the order given
        modes = [m for name in keep for m in modes if m.name == name]
    slos = None
    if args.ttft_slo is not None and args.tpot_slo is not None:
        slos = Slos(args.ttft_slo, args.tpot_slo, float("nan"), float("nan"), 1.0, 1.0, "given on the command line")
    elif modes[0].name != BASELINE:
        raise SystemExit("derived SLOs need the colocated mode (or pass --ttft-slo and --tpot-slo)")
    results = []
    for mode in modes:
        print(f"== {mode.name}: {mode.devices}", flush=True)
        res, slos = await run_mode(mode, specs, probes, slos, args, meta)
        results.append(res)
    print(write_outputs(results, slos, args, meta, cmd))  # type: ignore[arg-type]
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    apply_defaults(args)
    cmd = " ".join(["python -m bench.serving_compare", *argv])
    return asyncio.run(amain(args, cmd))


if __name__ == "__main__":
    sys.exit(main())
