"""Profiler: time the real engine's forward passes and fit DistServe's latency model (latency.py).

    python -m scheduler.planner.profile [--model PATH] --devices cpu:0 cpu:0-1 [--dtype float32] --out profile.json

Per device spec it builds one Instance (its thread pinned to the spec's cores, as the engine does),
hands it Steps over requests whose blocks come from the instance's own pool, and times
Instance.run on that thread: prefill batches over a grid of (batch size, prompt length), decode
steps over a grid of (batch size, context length); warm-up runs first, then the median of repeats.
DistServe's formulas are fitted by least squares and the fit's relative error is printed per phase.
On a CPU, "tp" in the profile is the instance's core count: a 1-core instance is tp 1, cpu:0-1 tp 2.

Also measured: KV bytes per token (the pool's block size in bytes), the KV capacity of the pool
(tokens), the KV hand-off bandwidth between two CPU pools (TorchTransfer.pull) and the swap
bandwidth (the indexed copies Instance.run makes); with --neighbor, how much a step slows while an
instance on other cores of the same process is busy (the "interference" factors the simulator applies).

Per-step overhead outside the forward (the engine's asyncio loop, token emission, HTTP streaming)
is not in these timings: pass --overhead-ms PREFILL,DECODE (measured elsewhere, e.g. by
bench/simulator_fidelity.py from an unloaded run against the real server) to fold it into the
constant terms; the profile records what was folded in under "profiling".
The timing itself is step_timing.py; this module chooses what to time, fits and writes the profile.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.config import CacheConfig
from engine.instance import Instance, cpu_cores
from engine.kv_cache import KVPool
from engine.model import LlamaModel
from scheduler.planner.latency import PhaseCoeffs, Profile, fit_coeffs
from scheduler.planner.step_timing import interference, swap_bandwidth, time_decode, time_prefill, transfer_bandwidth


@dataclass
class Grid:
    """What to time. Prefill: batch sizes x prompt lengths (a batch's lengths are equal, plus a few mixed
    batches so the quadratic term is not confounded with batch size); decode: batch sizes x contexts."""

    prefill_batch: tuple[int, ...] = (1, 2, 4)
    prefill_len: tuple[int, ...] = (16, 64, 128, 256, 384, 512)
    max_prefill_tokens: int = 1024  # skip grid points beyond this many tokens per batch
    mixed: tuple[tuple[int, ...], ...] = ((32, 256), (64, 128, 384), (16, 16, 512), (200, 100, 50, 300))
    decode_batch: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    decode_ctx: tuple[int, ...] = (32, 128, 256, 512)
    warmup: int = 1
    repeats: int = 3

    def prefill_batches(self) -> list[list[int]]:
        out = [[n] * b for b in self.prefill_batch for n in self.prefill_len if n * b <= self.max_prefill_tokens]
        return out + [list(m) for m in self.mixed if sum(m) <= self.max_prefill_tokens]


QUICK_GRID = Grid(prefill_batch=(1, 2), prefill_len=(16, 128, 256, 512), max_prefill_tokens=512,
                  mixed=((32, 256), (64, 128, 200)), decode_batch=(1, 4, 16), decode_ctx=(64, 256, 512), repeats=2)


@dataclass
class InstanceProfile:
    """What one device spec measured: raw samples (ms), the fit and its error, the pool's capacity."""

    device: str
    cores: int
    prefill: list[tuple[list[int], float]] = field(default_factory=list)
    decode: list[tuple[int, int, float]] = field(default_factory=list)
    coeffs: PhaseCoeffs | None = None
    report: dict = field(default_factory=dict)
    kv_capacity_tokens: int = 0


# candidate small/large decode-batch thresholds: 2 gives batch 1 (matrix-vector kernels) its own line;
# 5 is where the engine's bf16 GEMV for 1-4 rows hands over to oneDNN (engine/cpu_kernels.cpp)
DECODE_THRESHOLDS = (2, 4, 5, 8, 16, 95)


def fit_decode_threshold(prefill: list[tuple[list[int], float]], decode: list[tuple[int, int, float]],
                         thresholds: tuple[int, ...]) -> tuple[PhaseCoeffs, dict]:
    """fit_coeffs at the small/large-batch threshold (DistServe's format has one) that fits the decode
    samples best. On a CPU, batch 1 runs matrix-vector kernels and costs about half of batch 2: a
    threshold of 2 gives batch 1 its own line."""
    best = None
    for thr in thresholds:
        if sum(b < thr for _, b, _ in decode) < 3 or sum(b >= thr for _, b, _ in decode) < 3:
            continue  # a side without 3 samples would borrow the other's fit: not a real split
        coeffs, report = fit_coeffs(prefill, decode, thr)
        ds, dl = report["decoding_smallbs"], report["decoding_largebs"]
        err = (ds["mean_rel_error"] * ds["samples"] + dl["mean_rel_error"] * dl["samples"]) / len(decode)
        if best is None or err < best[0]:
            best = (err, coeffs, report)
    if best is None:
        return fit_coeffs(prefill, decode, max(thresholds))
    return best[1], best[2]


def profile_instance(inst: Instance, grid: Grid, thresholds: tuple[int, ...] = DECODE_THRESHOLDS,
                     log: Callable[[str], None] = print) -> InstanceProfile:
    cap = inst.pool.num_blocks * inst.pool.block_size
    cores = len(inst.cores) if inst.cores is not None else 1
    out = InstanceProfile(inst.spec, cores, kv_capacity_tokens=cap)
    for lengths in grid.prefill_batches():
        if sum(lengths) <= cap:
            out.prefill.append((lengths, time_prefill(inst, lengths, grid.warmup, grid.repeats)))
    for b in grid.decode_batch:
        for c in grid.decode_ctx:
            if inst.pool.allocator.blocks_for(c) * b <= inst.pool.num_blocks:
                out.decode.append((b * c, b, time_decode(inst, b, c, grid.warmup, grid.repeats)))
    out.coeffs, out.report = fit_decode_threshold(out.prefill, out.decode, thresholds)
    log(f"  {inst.spec} decode batch threshold {out.coeffs.threshold}")
    for phase, r in out.report.items():
        log(f"  {inst.spec} {phase:17s} mean rel error {r['mean_rel_error']:6.1%}  max {r['max_rel_error']:6.1%}"
            f"  ({r['samples']} samples)")
    return out


# ---- the profile -----------------------------------------------------------------------------------

def fold_overhead(coeffs: PhaseCoeffs, prefill_ms: float, decode_ms: float) -> PhaseCoeffs:
    """Per-step overhead outside the forward, added to the constant terms (the formulas have no
    other place for a per-step cost)."""
    p, ds, dl = coeffs.prefill, coeffs.decode_small, coeffs.decode_large
    return PhaseCoeffs((p[0] + prefill_ms, p[1], p[2]), (ds[0] + decode_ms, ds[1], ds[2]),
                       (dl[0] + decode_ms, dl[1], dl[2]), coeffs.threshold)


def build_profile(model: LlamaModel, name: str, devices: list[str], grid: Grid, cache: CacheConfig,
                  overhead_ms: tuple[float, float] = (0.0, 0.0), neighbor: str | None = None,
                  log: Callable[[str], None] = print) -> tuple[Profile, dict]:
    """Profile every device spec (one per core count) into one Profile, and the details per core
    count: raw samples (ms), fit errors, the overhead folded in. With `neighbor` (a device spec on
    other cores), the first device's interference factors are measured against an instance there."""
    tp: dict[int, PhaseCoeffs] = {}
    caps: dict[tuple[int, int], int] = {}
    details: dict[str, dict] = {}
    swap_bps = None
    factors: dict[str, float] = {}
    for spec in devices:
        cores = len(cpu_cores(spec))
        if cores in tp:
            raise ValueError(f"two device specs with {cores} cores: profile one per core count")
        inst = Instance(f"profile-{spec}", "colocated", spec, model, cache)
        try:
            log(f"profiling {spec} ({cores} cores, {inst.pool.num_blocks} KV blocks)")
            ip = profile_instance(inst, grid, log=log)
            swap_bps = swap_bps or inst.executor.submit(swap_bandwidth, inst.pool).result()
            if neighbor and not factors:
                other = Instance("profile-neighbor", "colocated", neighbor, model, cache)
                try:
                    factors = interference(inst, other)
                finally:
                    other.close()
                log(f"  interference next to a busy {neighbor}: prefill x{factors['prefill']:.2f}, "
                    f"decode x{factors['decode']:.2f}")
        finally:
            inst.close()
        tp[cores] = fold_overhead(ip.coeffs, *overhead_ms)
        caps[(cores, 1)] = ip.kv_capacity_tokens
        details[str(cores)] = {"device": spec, "fit": ip.report, "overhead_ms": list(overhead_ms),
                               "prefill_samples": [[ls, t] for ls, t in ip.prefill],
                               "decode_samples": [[s, b, t] for s, b, t in ip.decode]}
    probe = KVPool(model.cfg, CacheConfig(block_size=cache.block_size, num_blocks=1), model.dtype)
    prof = Profile(model=name, device=f"CPU ({torch.get_num_threads()} threads available), {model.dtype}",
                   device_kind="cpu", tp=tp, kv_capacity_tokens=caps,
                   kv_bytes_per_token=probe.block_bytes // cache.block_size,
                   transfer_bandwidth_Bps=transfer_bandwidth(model, cache.block_size),
                   swap_bandwidth_Bps=swap_bps, block_size=cache.block_size, interference=factors,
                   precision={"dtype": str(model.dtype).removeprefix("torch."),
                              "weights": "native" if model.native else "dense"})
    return prof, details


def profile_json(prof: Profile, details: dict) -> dict:
    """latency.py's format plus a "profiling" section (raw samples, fit errors, folded overhead)
    that load_profile ignores."""
    return {**prof.to_json(), "profiling": details}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scheduler.planner.profile", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="GGUF file or HF directory (default: the bundled SmolLM2 model)")
    p.add_argument("--devices", nargs="+", default=["cpu"], help="one instance spec per core count, e.g. cpu:0 cpu:0-1")
    p.add_argument("--dtype", default="auto", choices=["float32", "bfloat16", "auto"],
                   help="as the server's --dtype (default auto: what the server picks on this machine)")
    p.add_argument("--weights", default="auto", choices=["auto", "dense", "native"], help="as the server's --weights")
    p.add_argument("--kv-cache-memory", default="512MiB", help="KV pool per instance (as the server's flag)")
    p.add_argument("--overhead-ms", default="0,0", help="PREFILL,DECODE per-step overhead to fold in (ms)")
    p.add_argument("--neighbor", help="a device spec on other cores: measure interference against it (e.g. cpu:1)")
    p.add_argument("--quick", action="store_true", help="a smaller grid (about a quarter of the time)")
    p.add_argument("--out", default="out/profile.json", help="profile JSON to write (default: out/profile.json)")
    args = p.parse_args(argv)
    from engine.loader import load_checkpoint
    from engine.precision import build_model

    ckpt = load_checkpoint(args.model)
    model = build_model(ckpt, args.dtype, args.weights)
    over = tuple(float(x) for x in args.overhead_ms.split(","))
    prof, details = build_profile(model, ckpt.name, args.devices, QUICK_GRID if args.quick else Grid(),
                         CacheConfig(memory_bytes=args.kv_cache_memory), over,  # type: ignore[arg-type]
                                  args.neighbor)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(profile_json(prof, details), indent=1))
    for tp, c in sorted(prof.tp.items()):
        print(f"tp {tp}: prefill {_fmt(c.prefill)}  decode {_fmt(c.decode_small)}")
    print(f"KV {prof.kv_bytes_per_token} B/token, capacity {prof.kv_capacity_tokens}, transfer "
          f"{prof.transfer_bandwidth_Bps / 1e9:.1f} GB/s, swap {prof.swap_bandwidth_Bps / 1e9:.1f} GB/s -> {args.out}")
    return 0


def _fmt(c: tuple[float, float, float]) -> str:
    return "[" + ", ".join(f"{x:.4g}" for x in c) + "]"


if __name__ == "__main__":
    raise SystemExit(main())
