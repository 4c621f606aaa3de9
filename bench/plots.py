"""PNG plots of load-test results: attainment vs rate, latency CDFs, attainment vs SLO scale.

  python -m bench.plots DIR_OR_JSON... [--labels a,b,...] [--out attainment-vs-rate.png] [--cdf-out cdf.png]
Each argument is a loadgen output directory, its summary.json, or results-*.json files; each
configuration (label) becomes one curve. Synthetic workloads carry "(synthetic)" in their label.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Point = tuple[float, dict]  # (rate, summary)


def plot_attainment_vs_rate(
    curves: dict[str, list[Point]], out: str | Path, target: float | None = None, goodput: float | None = None
) -> None:
    """One configuration: TTFT, TPOT and joint attainment; several: joint attainment, one curve each."""
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(curves) == 1:
        (label, pts), = curves.items()  # fmt: skip
        pts = sorted(pts, key=lambda p: p[0])
        rates = [p[0] for p in pts]
        # Per-SLO curves thin and dashed underneath; the joint one (what goodput is read from) on top.
        for key, name in (("attainment_ttft", "TTFT"), ("attainment_tpot", "TPOT")):
            ax.plot(rates, [100 * p[1][key] for p in pts], marker=".", linestyle="--", linewidth=1, label=name)
        ax.plot(rates, [100 * p[1]["attainment_both"] for p in pts], marker="o", linewidth=2, color="black",
                label=f"{label}: both")  # fmt: skip
    else:
        for label, pts in curves.items():
            pts = sorted(pts, key=lambda p: p[0])
            ax.plot([p[0] for p in pts], [100 * p[1]["attainment_both"] for p in pts], marker="o", label=label)
    if target is not None:
        ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    if goodput:
        ax.axvline(goodput, color="red", linestyle=":", linewidth=1, label=f"goodput {goodput:.3g}/s")
    ax.set_xlabel("request rate (req/s)")
    _finish_attainment(fig, ax, out)


def _finish_attainment(fig, ax, out: str | Path) -> None:
    """The attainment axis every attainment plot shares, then save."""
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_latency_cdf(groups: dict[str, list[dict]], out: str | Path) -> None:
    """CDFs of TTFT, TPOT and end-to-end latency (successful requests), one line per group."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, name in zip(axes, ("ttft", "tpot", "e2e"), ("TTFT (s)", "TPOT (s)", "end-to-end (s)"), strict=True):
        for label, reqs in groups.items():
            xs = np.sort([r[key] for r in reqs if r.get("success") and r.get(key) is not None])
            if xs.size:
                ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=label)
        ax.set_xlabel(name)
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_slo_scale(curves: dict[str, list[dict]], out: str | Path, target: float | None = None) -> None:
    """Joint attainment against the SLO scale (both SLOs multiplied), one curve per rate/config."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in curves.items():
        pts = sorted(pts, key=lambda p: p["scale"])
        ax.plot([p["scale"] for p in pts], [100 * p["both"] for p in pts], marker="o", label=label)
    if target is not None:
        ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    scales = sorted({p["scale"] for pts in curves.values() for p in pts})
    ax.set_xticks(scales, [f"{x:g}" for x in scales])
    ax.minorticks_off()
    ax.set_xlabel("SLO scale (both SLOs multiplied)")
    _finish_attainment(fig, ax, out)


def _display_label(doc: dict) -> str:
    label = doc.get("label", "?")
    return f"{label} (synthetic)" if doc.get("synthetic") and "synthetic" not in label else label


def plot_run_dir(out_dir: Path, summary: dict, runs: list) -> None:
    """The plots of one loadgen invocation (runs: bench.runner.Run)."""
    label = _display_label(summary)
    done = [r for r in runs if not r.partial]
    if done:
        pts = [(r.rate, r.summary) for r in done]
        plot_attainment_vs_rate({label: pts}, out_dir / "attainment-vs-rate.png",
                                summary.get("attainment_target"), summary.get("goodput"))  # fmt: skip
    runs = sorted(runs, key=lambda r: r.rate)
    groups = {f"{r.rate:.4g}/s" + (" (partial)" if r.partial else ""): [x.to_dict() for x in r.results] for r in runs}
    plot_latency_cdf(groups, out_dir / "latency-cdf.png")
    if summary.get("slo_scale"):
        curves: dict[str, list[dict]] = defaultdict(list)
        for p in sorted(summary["slo_scale"], key=lambda p: p["rate"]):
            curves[f"{label} @ {p['rate']:.4g}/s"].append(p)
        plot_slo_scale(curves, out_dir / "attainment-vs-slo-scale.png", summary.get("attainment_target"))


def load_runs(paths: list[str | Path]) -> dict[str, list[tuple[float, dict, list[dict]]]]:
    """label -> [(rate, summary, requests)] from result files, summary.json files or output directories.

    A label found in several directories is prefixed with its directory name to keep configurations apart.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.glob("results-*.json") if not f.name.endswith("-partial.json"))
        elif p.name == "summary.json":
            files += sorted(f for f in p.parent.glob("results-*.json") if not f.name.endswith("-partial.json"))
        else:
            files.append(p)
    entries = []
    for f in dict.fromkeys(f.resolve() for f in files):  # a directory and its summary.json name the same files
        doc = json.loads(f.read_text())
        entries.append((f.parent, _display_label(doc), doc["rate"], doc["summary"], doc.get("requests", [])))
    dirs_per_label: dict[str, set] = defaultdict(set)
    for d, label, *_ in entries:
        dirs_per_label[label].add(d)
    out: dict[str, list] = defaultdict(list)
    for d, label, rate, summary, reqs in entries:
        key = f"{d.name}:{label}" if len(dirs_per_label[label]) > 1 else label
        out[key].append((rate, summary, reqs))
    return dict(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plots", description="plot loadgen results, one curve per config")
    p.add_argument("paths", nargs="+")
    p.add_argument("--labels", help="comma-separated names, one per path (directory or file), in order")
    p.add_argument("--out", default="attainment-vs-rate.png")
    p.add_argument("--cdf-out", help="also plot latency CDFs, one line per configuration and rate")
    p.add_argument("--target", type=float, default=0.9)
    args = p.parse_args(argv)
    if args.labels:
        names = args.labels.split(",")
        if len(names) != len(args.paths):
            p.error("--labels needs one name per path")
        runs = {}
        for name, path in zip(names, args.paths, strict=True):
            for pts in load_runs([path]).values():
                runs.setdefault(name, []).extend(pts)
    else:
        runs = load_runs(args.paths)
    if not runs:
        p.error("no results-*.json found")
    plot_attainment_vs_rate({k: [(r, s) for r, s, _ in v] for k, v in runs.items()}, args.out, args.target)
    print(f"wrote {args.out}")
    if args.cdf_out:
        groups = {f"{k} @ {r:.4g}/s": reqs for k, v in runs.items() for r, _, reqs in sorted(v, key=lambda x: x[0])}
        plot_latency_cdf(groups, args.cdf_out)
        print(f"wrote {args.cdf_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
