"""Re-fit the in-server model of a finished simulator-fidelity run from the step traces it saved and
re-simulate its rates against the same real runs: a change to the fit or to the simulator judged without
the ~25 minutes of serving (the real runs are what they were; only the simulated column changes).

    python -m bench.fidelity_refit --out bench/out/simulator-fidelity-band5 \
        --profile-dir bench/out/simulator-fidelity-band2

Takes the run's own flags (python -m bench.simulator_fidelity --help); reads OUT/fidelity.json,
OUT/fit-traces-MODE.json and OUT/traces-MODE.json, fits each rate's model as the bench does (held_out: the fit
runs and the other rates' runs), prints the table with the fresh fit's simulated values beside the saved ones.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from bench.fidelity_mode import MODES, held_out, in_server_profile, isolated_profile, judged, noise_draws
from bench.fidelity_report import noise_band
from bench.simulator_fidelity import parse, workload
from engine.config import SchedulerConfig
from scheduler.planner.latency import load_profile
from scheduler.planner.workload import SLO, ArrivalSpec, send_times
from scheduler.runtime.trace import StepRecord


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not args.profile_dir:
        raise SystemExit("--profile-dir: the profile the run used (its --profile-dir, or its own --out)")
    from engine.loader import load_tokenizer

    out = Path(args.out)
    if not (out / "fidelity.json").exists():
        raise SystemExit(f"no {out / 'fidelity.json'}: run `make bench-simulator` (its --out) first")
    doc = json.loads((out / "fidelity.json").read_text())
    prof = load_profile(Path(args.profile_dir) / "profile.json")
    specs = workload(args, load_tokenizer(), args.seed)
    lengths = [(s.prompt_len, s.output_len) for s in specs]
    sched = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_prefill_tokens=args.max_prefill_tokens)
    met = total = 0
    print("| mode | load | real both % per run | saved sim (diff) | re-fitted sim (diff) | bar | met |")
    print("|---|---:|---|---:|---:|---:|---|")
    for m in doc["modes"]:
        mode = m["mode"]
        _, layout, tp = MODES[mode]
        missing = [f for f in (f"fit-traces-{mode}.json", f"traces-{mode}.json") if not (out / f).exists()]
        if missing:
            raise SystemExit(f"{out} has no {', '.join(missing)}: a run from before the bench saved its traces")
        records = [StepRecord.from_json(d) for d in json.loads((out / f"fit-traces-{mode}.json").read_text())]
        traces = {k: [StepRecord.from_json(d) for d in v]
                  for k, v in json.loads((out / f"traces-{mode}.json").read_text()).items()}
        cal = m["calibration"]  # the isolated profile: what the run fell back to, should the fit fail
        slo, front = SLO(m["slo"]["ttft"], m["slo"]["tpot"]), cal["front_end_ttft_ms"] / 1e3
        for row in m["rows"]:
            srv_prof, fitted = in_server_profile(prof, tp, mode, isolated_profile(prof, tp, cal),
                                                 held_out(records, traces, str(row["rate"])))
            print(f"[{mode}] {row['rate']} req/s re-fit: stall {fitted.get('arrival_stall_ms')} ms, interference "
                  f"{fitted['interference']}, noise {fitted.get('step_noise')}", file=sys.stderr)
            times = send_times(ArrivalSpec("poisson"), row["rate"], len(specs), args.seed)
            sims = noise_draws(srv_prof, layout, times, lengths, slo, sched, args)
            band = noise_band(row["real_both_runs"], statistics.mean(judged(s, slo, front)["both"] for s in sims))
            met, total = met + band["met"], total + 1
            runs = " / ".join(f"{x:.1f}" for x in row["real_both_runs"])
            print(f"| {mode} | {row['load']:.1f} | {runs} | {row['sim_both']:.1f} ({row['diff']:+.1f}) | "
                  f"{band['real_both'] + band['diff']:.1f} ({band['diff']:+.1f}) | {band['bar']:.1f} | "
                  f"{'yes' if band['met'] else 'no'} |")
    print(f"re-fitted: {met}/{total} rates within the bar")
    return 0


if __name__ == "__main__":
    sys.exit(main())
