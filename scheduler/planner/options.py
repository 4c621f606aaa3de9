"""The flags the planner's command lines share (placement search, one-layout simulation): the profile and
its overrides, the SLOs, and the scheduler's batch limits, with what they turn into."""
from __future__ import annotations

import argparse

from engine.config import SchedulerConfig
from scheduler.planner.latency import Profile, load_profile, phases
from scheduler.planner.workload import SLO

SCHEDULER_KNOBS = ("max_num_seqs", "max_prefill_tokens", "max_prefill_seqs", "chunk_budget")


def add_profile_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--profile", required=True, help="profile JSON (ours, or DistServe's with max_num_tokens.csv)")
    ap.add_argument("--decode-profile", help="price the decode instances with this profile (a server whose decode "
                    "instances run another precision: --decode-weights); the prefill ones with --profile")
    ap.add_argument("--model", help="model key inside a DistServe profile (e.g. facebook/opt-13b)")
    ap.add_argument("--transfer-bandwidth", type=float, help="KV link bytes/s; default from the profile")
    for name in SCHEDULER_KNOBS:
        ap.add_argument("--" + name.replace("_", "-"), type=int, help="SchedulerConfig; default from the profile")


def add_slo_flags(ap: argparse.ArgumentParser, attainment: bool = True) -> None:
    ap.add_argument("--ttft-slo", type=float, required=True, help="seconds")
    ap.add_argument("--tpot-slo", type=float, required=True, help="seconds")
    if attainment:
        ap.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet both")


def profile_of(args: argparse.Namespace) -> Profile:
    profile = load_profile(args.profile, args.model)
    if getattr(args, "decode_profile", None):
        profile = phases(profile, load_profile(args.decode_profile, args.model))
    if args.transfer_bandwidth:
        profile.transfer_bandwidth_Bps = args.transfer_bandwidth
    return profile


def scheduler_config(profile: Profile, args: argparse.Namespace) -> SchedulerConfig:
    """The profile's scheduler defaults for its device, overridden by the flags given."""
    knobs = dict(profile.scheduler)
    knobs.update({k: getattr(args, k) for k in SCHEDULER_KNOBS if getattr(args, k) is not None})
    return SchedulerConfig(**knobs)


def slo_of(args: argparse.Namespace) -> SLO:
    return SLO(args.ttft_slo, args.tpot_slo, getattr(args, "attainment", 0.9))
