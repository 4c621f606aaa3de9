"""Simulator fidelity: SLO attainment the planner's simulator predicts vs what the load tester measures
against the real server, same requests, same arrival times (DistServe's Table 2, on our CPU engine),
judged against the real server's own run-to-run noise.

    make bench-simulator [ARGS="--quick"]       (python -m bench.simulator_fidelity --help)

Bar, at every rate: |simulated - mean of the real runs| <= max(2 points, the real runs' spread), the
spread being the highest minus the lowest of --repeats real runs of the same requests and send times
(on a shared machine two real runs can differ by more than 2 points; a simulator cannot be held closer
to the server than the server is to itself).

Per mode (disagg: prefill cpu:C0 + decode cpu:C1; colocated and chunked: one instance on cpu:C0-C1):
1. profile the instance configurations it uses in isolation (scheduler/planner/profile.py; or --profile-dir);
2. start the real server (--dtype/--weights as given; default: the server's own auto, --step-trace), send a
   few requests one at a time (unloaded): their TTFT/TPOT set the SLOs (x --slo-scale); the time each TTFT
   spends outside the engine's traced prefill iteration is the front end's share (HTTP, tokenizing, delivery);
3. the in-server model: other requests (seed + 1, ...) at the --fit-load loads, run in every round
   beside the measured rates (the machine's speed drifts over minutes: fit and test see the same drift); each
   rate's latency model is fitted to the steps the server traced while serving them and the other rates' runs,
   never that rate's own (bench/fidelity_mode.py held_out; scheduler/planner/trace_fit.py: iteration
   times with the event loop and the other instance competing, interference and the stall each arriving
   request's front-end work adds to the steps in flight split out), and the fitted
   model's error on each of those steps (measured / modelled) becomes its step noise: the simulator
   multiplies every step by one of them drawn at random (--noise-draws simulations, averaged), since a
   server whose steps vary queues longer than one whose steps all take the mean;
4. at each rate, the same seeded Poisson send times and lengths go to the server through the load
   tester, --repeats times (in rounds: every rate once, then again), and once to
   scheduler.planner.simulator.simulate with the same layout and scheduler limits; simulated TTFTs get
   the front-end time added. The table's "sim" is the in-server model; the isolated profile (its
   unloaded overhead folded into the constant terms) is shown beside it. The last column: the rate's
   real traced step times over the in-server model's price for the same steps (1.00: the model prices
   what ran right, so a gap in attainment comes from elsewhere).
Writes OUT/fidelity.json and OUT/fidelity.md (the table) and prints it; each server's log is
OUT/server-MODE.log, its step traces OUT/traces-MODE.json (the measured rates) and OUT/fit-traces-MODE.json
(the in-server fit's runs). One mode's run is bench/fidelity_mode.py, the table bench/fidelity_report.py.

Workload: ShareGPT prompts (bench/sharegpt.py, DistServe's preprocessing) cut to a length drawn
uniformly from [--min-prompt, --max-prompt] tokens, outputs uniform in [--min-output, --max-output]
tokens (ignore_eos): the lengths are capped so a rate point runs in about a minute on this CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from bench.datasets import RequestSpec, load_dataset
from bench.fidelity_mode import C0, C1, run_mode
from bench.fidelity_report import HEADER, markdown, verdict
from engine.config import CacheConfig
from scheduler.planner.latency import Profile, load_profile
from scheduler.planner.profile import Grid, build_profile, profile_json


def workload(args, tok, seed: int) -> list[RequestSpec]:
    base = load_dataset("sharegpt", tok, args.num_requests, seed, 2048, None)
    rng = random.Random(seed)
    out = []
    for s in base:
        ids = s.prompt_ids[:rng.randint(args.min_prompt, args.max_prompt)]
        out.append(RequestSpec(ids, tok.decode(ids), len(ids), rng.randint(args.min_output, args.max_output)))
    return out


def workload_grid(args) -> Grid:
    """The profile grid over the sizes this workload runs: prompts up to --max-prompt (batches of a few),
    decode contexts up to prompt + output, batches to 32. One linear formula fits a narrow range far
    better than the profiler's default 16-1024 tokens."""
    hi = args.max_prompt
    lens = tuple(sorted({args.min_prompt, hi // 4, hi // 2, 3 * hi // 4, hi}))
    ctx = tuple(sorted({args.min_prompt, (args.min_prompt + hi) // 2, hi + args.max_output}))
    return Grid(prefill_batch=(1, 2, 4), prefill_len=lens, max_prefill_tokens=4 * hi,
                mixed=((args.min_prompt, hi), (hi // 4, hi // 2, hi)), decode_batch=(1, 2, 4, 8, 16, 32),
                decode_ctx=ctx, warmup=1, repeats=2 if args.quick else 3)


def get_profile(args) -> Profile:
    if args.profile_dir:
        return load_profile(Path(args.profile_dir) / "profile.json")

    from engine.loader import load_checkpoint
    from engine.precision import build_model

    ckpt = load_checkpoint()
    model = build_model(ckpt, args.dtype, args.weights)
    devices = [f"cpu:{C0}"] + ([f"cpu:{C0}-{C1}"] if any(m != "disagg" for m in args.modes) else [])
    prof, details = build_profile(model, ckpt.name, devices, workload_grid(args), CacheConfig(),
                                  neighbor=f"cpu:{C1}" if C1 != C0 else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(profile_json(prof, details), indent=1))
    return prof


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.simulator_fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer requests and real runs, small profile grid")
    p.add_argument("--modes", default="disagg,colocated", help="comma list of disagg,colocated,chunked")
    p.add_argument("--profile-dir", help="reuse DIR/profile.json (from an earlier run) instead of profiling")
    p.add_argument("--num-requests", type=int)
    p.add_argument("--load", help="comma list of rates as fractions of the estimated capacity")
    p.add_argument("--slo-scale", type=float, default=3.0, help="SLO = scale x unloaded TTFT / TPOT")
    p.add_argument("--calibration-requests", type=int, default=5)
    p.add_argument("--repeats", type=int, help="real runs per rate, same requests and send times (default 3; "
                   "--quick 2): their spread is the noise band the simulator is judged in")
    p.add_argument("--fit-load", default="0.5,1.4",
                   help="loads of the runs whose step traces fit the in-server model (other requests: seed + 1, ...)")
    p.add_argument("--noise-draws", type=int, default=5,
                   help="simulations per rate with the in-server model's step noise (seeds seed..seed+N-1), averaged")
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=128)
    p.add_argument("--min-output", type=int, default=8)
    p.add_argument("--max-output", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-prefill-tokens", type=int, default=512,
                   help="prompt tokens per prefill batch, server and simulator: past ~500 tokens a CPU batch runs "
                        "slower per token than DistServe's formula can price (it has no (sum l)^2 term)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="the server's and the profile's --dtype (default auto: what the server runs on this machine)")
    p.add_argument("--weights", default="auto", choices=["auto", "dense", "native"], help="as the server's --weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=0, help="the server's port (0: a free one)")
    p.add_argument("--out", default="bench/out/simulator-fidelity")
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    args.modes = args.modes.split(",")
    args.num_requests = args.num_requests or (24 if args.quick else 80)
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.load = [float(x) for x in (args.load or "0.3,0.6,0.9,1.2,1.5").split(",")]
    args.fit_load = [float(x) for x in args.fit_load.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from engine.loader import load_tokenizer

    tok = load_tokenizer()
    specs = workload(args, tok, args.seed)
    t0 = time.time()
    prof = get_profile(args)
    print(f"profile ready in {time.time() - t0:.0f} s", flush=True)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": "python -m bench.simulator_fidelity " +
           " ".join(argv if argv is not None else sys.argv[1:]), "machine": f"{os.cpu_count()} CPU cores",
           "workload": f"{len(specs)} ShareGPT prompts cut to U[{args.min_prompt},{args.max_prompt}] tokens, outputs "
           f"U[{args.min_output},{args.max_output}] tokens, Poisson arrivals (seed {args.seed}), "
           f"--dtype {args.dtype} --weights {args.weights}",
           "slo_scale": args.slo_scale, "repeats": args.repeats, "interference": prof.interference, "modes": []}
    print(HEADER, flush=True)
    fit_sets = [workload(args, tok, args.seed + 1 + i) for i in range(len(args.fit_load))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:  # written after each mode: a later failure keeps what was measured
        doc["modes"].append(run_mode(mode, args, specs, fit_sets, prof))
        (out / "fidelity.json").write_text(json.dumps(doc, indent=1))
        (out / "fidelity.md").write_text(markdown(doc))
    print(markdown(doc))
    print(f"{verdict(doc)}; total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
