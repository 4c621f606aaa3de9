"""How a serving comparison's goodput ratio depends on the SLOs: re-judge the recorded requests of
`make bench-serving` at scaled TTFT and TPOT SLOs (no new runs), as DistServe's SLO-scale figures do.

    python -m bench.slo_sensitivity OUT_DIR [--ttft-scales 0.5,1,2] [--tpot-scales 0.75,1,1.5]

OUT_DIR is serving_compare's --out (one sub-directory of results-*.json per mode). For each pair of
scales, each mode's goodput is the highest measured rate such that it and every lower measured rate
reach the attainment target (conservative where noise makes attainment non-monotone); the table gives
the best disaggregated mode's goodput per core over colocated's ("> r": colocated misses even at its
lowest measured rate, so its goodput is below that rate; "-": neither passes at any measured rate).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.metrics import MeasuredRequest, attainment
from bench.serving_report import BASELINE


def load(out_dir: Path) -> dict[str, dict]:
    """mode -> {"cores": n, "ttft_slo", "tpot_slo", "target", "runs": [(rate, [MeasuredRequest])]}"""
    modes: dict[str, dict] = {}
    for f in sorted(out_dir.glob("*/results-*.json")):
        if f.name.endswith("-partial.json"):
            continue
        doc = json.loads(f.read_text())
        m = modes.setdefault(f.parent.name, {"cores": doc["num_gpus"], "ttft_slo": doc["ttft_slo"],
                                             "tpot_slo": doc["tpot_slo"], "target": doc["attainment_target"],
                                             "runs": []})
        m["runs"].append((doc["rate"], [MeasuredRequest.from_dict(r) for r in doc["requests"]]))
    if BASELINE not in modes:
        raise ValueError(f"{out_dir} has no {BASELINE}/results-*.json")
    return modes


def goodput(mode: dict, ttft_scale: float, tpot_scale: float) -> float:
    best = 0.0
    for rate, results in sorted(mode["runs"], key=lambda r: r[0]):
        a = attainment(results, mode["ttft_slo"] * ttft_scale, mode["tpot_slo"] * tpot_scale)["both"]
        if a < mode["target"]:
            break
        best = rate
    return best


def table(modes: dict[str, dict], ttft_scales: list[float], tpot_scales: list[float]) -> str:
    base = modes[BASELINE]
    disagg = [name for name in modes if name.startswith("disagg")]
    lines = ["| TPOT scale \\ TTFT scale | " + " | ".join(f"{s:g}x" for s in ttft_scales) + " |",
             "|---|" + "---:|" * len(ttft_scales)]
    for ps in tpot_scales:
        cells = []
        for ts in ttft_scales:
            g0 = goodput(base, ts, ps) / base["cores"]
            best = max(((goodput(modes[d], ts, ps) / modes[d]["cores"], d) for d in disagg), default=(0.0, "-"))
            lowest = min(r for r, _ in base["runs"])  # colocated 0: below its lowest measured rate
            best_rate = best[0] * modes[best[1]]["cores"] if disagg else 0.0
            if g0:
                cells.append(f"{best[0] / g0:.2f}x ({best_rate:g} vs {g0 * base['cores']:g})")
            elif best[0]:
                cells.append(f"> {best[0] / (lowest / base['cores']):.2f}x ({best_rate:g} vs < {lowest:g})")
            else:
                cells.append(f"- (0 vs < {lowest:g})")
        lines.append(f"| {ps:g}x | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.slo_sensitivity", description=__doc__.split("\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--ttft-scales", type=_floats, default=[0.5, 1.0, 2.0])
    p.add_argument("--tpot-scales", type=_floats, default=[0.75, 1.0, 1.5])
    args = p.parse_args(argv)
    modes = load(args.out_dir)
    b = modes[BASELINE]
    print(f"SLOs at 1x: TTFT {b['ttft_slo']:.3g} s, TPOT {b['tpot_slo'] * 1e3:.0f} ms; cells: best disagg "
          f"goodput per core / colocated's (goodputs in req/s); rates measured: "
          f"{sorted(r for r, _ in b['runs'])}")
    print(table(modes, args.ttft_scales, args.tpot_scales))
    return 0


if __name__ == "__main__":
    sys.exit(main())
