"""The simulator-fidelity table (bench/simulator_fidelity.py): one row per mode and rate, real vs
simulated attainment, and a note per mode on its SLOs and latency models."""
from __future__ import annotations

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
