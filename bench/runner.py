"""One measured run at one rate, its result file, and the terminal table."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bench.client import ClientConfig, run_load
from bench.datasets import RequestSpec
from bench.metrics import MeasuredRequest, summarize
from scheduler.planner.workload import ArrivalSpec, send_times


@dataclass
class Run:
    rate: float
    results: list[MeasuredRequest]
    summary: dict
    partial: bool = False  # interrupted before every request finished
    file: str = ""
    meta: dict = field(default_factory=dict)


async def run_rate(
    specs: list[RequestSpec],
    rate: float,
    client: ClientConfig,
    arrival: ArrivalSpec,
    seed: int,
    ttft_slo: float | None,
    tpot_slo: float | None,
    sink: list[MeasuredRequest] | None = None,
) -> Run:
    """Sends every spec once at `rate` (arrivals from `arrival`, seeded) and summarizes the run."""
    times = send_times(arrival, rate, len(specs), seed)
    results = await run_load(specs, times, client, sink=sink, desc=f"rate {rate:.4g}/s")
    return Run(rate, results, summarize(results, ttft_slo, tpot_slo))


def rate_tag(rate: float) -> str:
    return f"{rate:.4g}".replace("+", "")


def write_run(out_dir: Path, label: str, run: Run, meta: dict) -> Path:
    """DIR/results-<label>-rate<R>.json: the run's configuration, summary and every request."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"results-{label}-rate{rate_tag(run.rate)}{'-partial' if run.partial else ''}.json"
    doc = {
        **meta,
        "label": label,
        "rate": run.rate,
        "partial": run.partial,
        "summary": run.summary,
        "requests": [r.to_dict() for r in run.results],
    }
    path.write_text(json.dumps(doc, indent=1))
    run.file = path.name
    return path


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_table(runs: list[Run], title: str = "") -> str:
    """Plain-text table of runs; the second header row gives each column's unit."""
    cols = [
        ("rate", "req/s", 8), ("n", "", 5), ("fail", "", 5), ("TTFT p50", "ms", 9), ("p90", "ms", 8),
        ("p99", "ms", 8), ("TPOT p50", "ms", 9), ("p90", "ms", 7), ("p99", "ms", 7), ("E2E p50", "s", 9),
        ("p99", "s", 9), ("done", "req/s", 7), ("output", "tok/s", 8), ("att TTFT", "%", 9), ("TPOT", "%", 6),
        ("both", "%", 6),
    ]  # fmt: skip
    lines = [title] if title else []
    lines.append(" ".join(f"{c:>{w}}" for c, _, w in cols))
    lines.append(" ".join(f"{u:>{w}}" for _, u, w in cols))
    for run in runs:
        s = run.summary
        cells = [
            f"{run.rate:.4g}" + ("*" if run.partial else ""), str(s["num_requests"]), str(s["num_failed"]),
            _ms(s["ttft_p50"]), _ms(s["ttft_p90"]), _ms(s["ttft_p99"]),
            _ms(s["tpot_p50"]), _ms(s["tpot_p90"]), _ms(s["tpot_p99"]),
            _s(s["e2e_p50"]), _s(s["e2e_p99"]),
            f"{s['request_throughput']:.2f}", f"{s['output_token_throughput']:.0f}",
            *(f"{100 * s[k]:.1f}" for k in ("attainment_ttft", "attainment_tpot", "attainment_both")),
        ]  # fmt: skip
        lines.append(" ".join(f"{c:>{w}}" for c, (_, _, w) in zip(cells, cols, strict=True)))
    errors: dict[str, int] = {}
    for run in runs:
        for e, n in run.summary["errors"].items():
            errors[e] = errors.get(e, 0) + n
    if errors:
        lines.append("failed requests (counted as SLO misses):")
        lines += [f"  {n:5d} x {e}" for e, n in sorted(errors.items(), key=lambda kv: -kv[1])]
    if any(r.partial for r in runs):
        lines.append("* interrupted: partial run")
    return "\n".join(lines)
