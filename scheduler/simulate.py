"""Simulate one layout on one request file: each request's TTFT and TPOT, and the SLO attainment.

    python -m scheduler.simulate --profile PROFILE.json [--model KEY] --requests REQUESTS.json \
        --prefill tp=2,pp=1 --decode tp=1,pp=1[,n=2] --ttft-slo 0.2 --tpot-slo 0.1 [--out RESULT.json]
    python -m scheduler.simulate ... --colocated tp=1,pp=1,n=2 [--chunked] ...

Request file: a JSON list of {"arrival": seconds, "prompt_len": n, "output_len": m} (the fields of
DistServe's simulator's workload files, with the arrival named for what it is); requests run with
ignore_eos, so each produces exactly output_len tokens. Layout: `tp`, `pp` and `n` (instances, 1 by
default) per phase. The profile is ours or DistServe's (latency.py: load_profile), with its scheduler
defaults unless flags override them.

Output (stdout, or --out): {"attainment": {"ttft": x, "tpot": y, "both": z}, "requests": [{"ttft": s,
"tpot": s, ...}, ...in file order], "layout": {...}, "profile": {...}, "slo": {...}, "duration": s}.
Attainment is judged as DistServe does: the share of all requests with TTFT <= the TTFT SLO, with
TPOT <= the TPOT SLO, and with both. TTFT = first token - arrival; TPOT = (last token - first token) /
(output_len - 1), none for a one-token output (it meets any TPOT SLO).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from scheduler.planner.options import add_profile_flags, add_slo_flags, profile_of, scheduler_config, slo_of
from scheduler.planner.simulator import Layout, Parallel, simulate


def parse_parallel(text: str) -> Parallel:
    """'tp=T,pp=P[,n=N]' -> Parallel(T, P, N)."""
    fields = {}
    for part in text.split(","):
        key, eq, value = part.strip().partition("=")
        if not eq or key not in ("tp", "pp", "n") or key in fields:
            raise argparse.ArgumentTypeError(f"bad layout {text!r}: use tp=T,pp=P[,n=N]")
        try:
            fields[key] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad layout {text!r}: {key} must be an integer") from None
    if "tp" not in fields or "pp" not in fields:
        raise argparse.ArgumentTypeError(f"bad layout {text!r}: tp and pp are required")
    try:
        return Parallel(fields["tp"], fields["pp"], fields.get("n", 1))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def read_requests(path: str | Path) -> tuple[list[float], list[tuple[int, int]]]:
    """(arrivals, [(prompt_len, output_len)]) from a request file, in file order."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: need a non-empty JSON list of requests")
    arrivals, lengths = [], []
    for i, r in enumerate(data):
        try:
            t, p, o = float(r["arrival"]), int(r["prompt_len"]), int(r["output_len"])
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path}: request {i} needs numeric arrival, prompt_len and output_len") from None
        if t < 0 or p < 1 or o < 1:
            raise ValueError(f"{path}: request {i}: arrival must be >= 0, prompt_len and output_len >= 1")
        arrivals.append(t)
        lengths.append((p, o))
    return arrivals, lengths


def layout_of(args: argparse.Namespace) -> Layout:
    if args.colocated:
        if args.prefill or args.decode:
            raise ValueError("give --colocated alone, or --prefill with --decode")
        return Layout("colocated", colocated=args.colocated, chunked=args.chunked)
    if not (args.prefill and args.decode):
        raise ValueError("a layout needs --prefill and --decode (disaggregated) or --colocated")
    if args.chunked:
        raise ValueError("--chunked applies to --colocated layouts only")
    return Layout("disagg", prefill=args.prefill, decode=args.decode)


def layout_json(layout: Layout) -> dict:
    out: dict = {"mode": layout.mode}
    for role in ("prefill", "decode", "colocated"):
        spec = getattr(layout, role)
        if spec is not None:
            out[role] = {"tp": spec.tp, "pp": spec.pp, "n": spec.count}
    if layout.mode == "colocated":
        out["chunked"] = layout.chunked
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m scheduler.simulate", description=__doc__.split("\n")[0])
    add_profile_flags(ap)
    ap.add_argument("--requests", required=True, help='JSON list of {"arrival": s, "prompt_len": n, "output_len": m}')
    add_slo_flags(ap, attainment=False)
    ap.add_argument("--prefill", type=parse_parallel, help="prefill instances: tp=T,pp=P[,n=N]")
    ap.add_argument("--decode", type=parse_parallel, help="decode instances: tp=T,pp=P[,n=N]")
    ap.add_argument("--colocated", type=parse_parallel, help="colocated instances: tp=T,pp=P[,n=N]")
    ap.add_argument("--chunked", action="store_true", help="colocated: chunked prefill")
    ap.add_argument("--out", help="write the result JSON here instead of stdout")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        layout = layout_of(args)
        profile = profile_of(args)
        arrivals, lengths = read_requests(args.requests)
        slo = slo_of(args)
        res = simulate(profile, layout, arrivals, lengths, slo, scheduler_config(profile, args))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {
        "attainment": {"ttft": res.attainment(True, False), "tpot": res.attainment(False, True),
                       "both": res.joint_attainment},
        "requests": [asdict(r) for r in res.requests],
        "layout": layout_json(layout),
        "profile": {"path": args.profile, "model": profile.model, "device": profile.device},
        "slo": {"ttft": slo.ttft, "tpot": slo.tpot},
        "duration": res.duration,
    }
    text = json.dumps(result, indent=1) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
