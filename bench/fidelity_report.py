"""The simulator-fidelity table (bench/simulator_fidelity.py): one row per mode and rate, the real runs'
mean attainment and spread vs the simulated attainment, the bar each row is held to, and a note per
mode on its SLOs and latency models."""
from __future__ import annotations

HEADER = ("| mode | rate (req/s) | load | real TTFT/TPOT/both % (mean) | real both % per run | spread (pts) |"
          " sim TTFT/TPOT/both % | diff (pts) | bar (pts) | met | isolated-profile sim both % (diff) |"
          " TTFT mean real/sim ms | TPOT mean real/sim ms | real step / model: prefill, decode |")
COLUMNS = 14


def noise_band(real_both: list[float], sim_both: float) -> dict:
    """The bar at one rate: the simulator's joint attainment must lie within max(2 points, the real runs'
    spread) of their mean. Spread = highest - lowest real run (same requests, same send times), the
    honest width of what the real server itself reproduces."""
    mean = sum(real_both) / len(real_both)
    spread = max(real_both) - min(real_both)
    bar = max(2.0, spread)
    diff = sim_both - mean
    return {"real_both": mean, "real_spread": spread, "diff": diff, "bar": bar, "met": abs(diff) <= bar}


def fmt_row(mode: str, r: dict) -> str:
    return (f"| {mode} | {r['rate']:.3g} | {r['load']:.2f} | {r['real_ttft']:.1f} / {r['real_tpot']:.1f} / "
            f"{r['real_both']:.1f} | {', '.join(f'{x:.1f}' for x in r['real_both_runs'])} | {r['real_spread']:.1f} | "
            f"{r['sim_ttft']:.1f} / {r['sim_tpot']:.1f} / {r['sim_both']:.1f} | {r['diff']:+.1f} | {r['bar']:.1f} | "
            f"{'yes' if r['met'] else 'NO'} | {r['iso_both']:.1f} ({r['iso_diff']:+.1f}) | "
            f"{r['real_ttft_mean_ms']:.0f} / {r['sim_ttft_mean_ms']:.0f} | "
            f"{r['real_tpot_mean_ms']:.1f} / {r['sim_tpot_mean_ms']:.1f} | "
            + ", ".join("-" if v is None else f"{v:.2f}" for v in r.get("step_ratio", {}).values()) + " |")


def verdict(doc: dict) -> str:
    rows = [(m["mode"], r) for m in doc["modes"] for r in m["rows"]]
    missed = [f"{mode} {r['rate']:.3g} req/s ({r['diff']:+.1f} pts, bar {r['bar']:.1f})" for mode, r in rows
              if not r["met"]]
    head = (f"{len(rows) - len(missed)}/{len(rows)} rows within max(2 points, the real spread); "
            f"{sum(abs(r['diff']) <= 2 for _, r in rows)}/{len(rows)} within 2 points")
    return head + (f". Missed: {'; '.join(missed)}" if missed else "")


def fit_summary(mode_fit: dict, f: dict) -> str:
    """One rate's in-server model (bench/fidelity_mode.py held_out: fitted without that rate's own runs)."""
    if f["coeffs"] is None:
        return f"at {f['rate']} req/s not fitted ({f['fit']['error']}): the isolated profile stands in"
    return (f"at {f['rate']} req/s fitted to {f['fit']['samples']} traced steps (the fit runs at {mode_fit['rates']} "
            f"req/s and the other rates' runs), interference {f['interference']}, arrival stall (ms per request "
            f"arriving during a step) {f.get('arrival_stall_ms', 'none')}, step noise (measured - stall / modelled) "
            f"{f.get('step_noise', 'none')}")


def markdown(doc: dict) -> str:
    lines = [f"Simulator fidelity ({doc['date']}, {doc['command']})", "",
             f"Workload: {doc['workload']}; the real server {doc.get('repeats', 1)} times per rate (same requests "
             "and send times, in rounds over the rates)", "", HEADER, "|" + "---|" * COLUMNS]
    for m in doc["modes"]:
        lines += [fmt_row(m["mode"], r) for r in m["rows"]]
    lines.append("")
    for m in doc["modes"]:
        c = m["calibration"]
        fit = ("; ".join(fit_summary(m["in_server_fit"], f) for f in m["in_server_fit"]["per_rate"])
               if "per_rate" in m["in_server_fit"] else "one model fitted to the fit runs (a run from before held_out)")
        lines.append(f"- {m['mode']}: SLO TTFT {m['slo']['ttft'] * 1e3:.0f} ms / TPOT {m['slo']['tpot'] * 1e3:.0f} ms "
                     f"({doc['slo_scale']} x unloaded {c['ttft_s'] * 1e3:.0f} / {c['tpot_s'] * 1e3:.1f} ms). "
                     f"In-server model: {fit}, front end "
                     f"{c['front_end_ttft_ms']:.1f} ms per TTFT. Isolated profile: overhead folded into the "
                     f"constants, prefill {c['overhead_prefill_ms']:.1f} ms, decode {c['overhead_decode_ms']:.1f} ms")
    lines.append(f"- isolated profile's interference factors (step time while the other instance is busy): "
                 f"{doc['interference']}")
    lines.append(f"- {verdict(doc)}")
    return "\n".join(lines) + "\n"
