"""Pure logic of `make bench-serving` (bench/serving_compare.py): layouts, the capped workload, SLOs
derived from unloaded latency, the goodput-per-core table and the server-side latency breakdown.

Nothing here starts a server or loads a model, so tests drive it directly.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from bench.datasets import RequestSpec, Tokenizer

BASELINE = "colocated"


@dataclass(frozen=True)
class Mode:
    """One server configuration: its name (directory and label), server flags, and the cores it uses."""

    name: str
    server_args: tuple[str, ...]
    devices: str
    cores: int


def _cpu(cores: list[int]) -> str:
    return "cpu:" + ",".join(map(str, cores))


def layouts(cores: list[int], kv_total_mib: int, splits: list[int] | None = None, ray: bool = False,
            native_decode: bool = False) -> list[Mode]:
    """Colocated, colocated + chunked prefill, then one disagg layout per prefill/decode core split (with `ray`,
    each followed by the same layout as Ray actors: --cluster ray, "disagg-1p1d-ray"; with `native_decode`, by the
    same layout with its decode instance on native weights: "disagg-1p1d-native-decode").

    `splits` lists prefill core counts (default: every split, 1..n-1); on 2 cores that is 1p + 1d.
    Every mode gets the same total KV budget, split evenly across its instances, so memory is no
    hidden advantage.
    """
    n = len(cores)
    kv = f"{kv_total_mib}MiB"
    modes = [
        Mode(BASELINE, ("--mode", "colocated", "--devices", "cpu", "--kv-cache-memory", kv), f"cpu ({n} cores)", n),
        Mode("chunked", ("--mode", "colocated", "--chunked-prefill", "--chunk-budget", "128", "--devices", "cpu",
                         "--kv-cache-memory", kv),
             f"cpu ({n} cores), chunked prefill", n),
    ]  # fmt: skip
    for p in splits if splits is not None else range(1, n):
        if not 0 < p < n:
            raise ValueError(f"prefill cores must be in [1, {n - 1}], got {p}")
        pre, dec = _cpu(cores[:p]), _cpu(cores[p:])
        half = f"{kv_total_mib // 2}MiB"
        args = ("--mode", "disagg", "--prefill-devices", pre, "--decode-devices", dec, "--kv-cache-memory", half)
        modes.append(Mode(f"disagg-{p}p{n - p}d", args, f"prefill {pre}, decode {dec}", n))
        if ray:  # each instance a Ray actor (its own process) instead of a thread of the server
            modes.append(Mode(f"disagg-{p}p{n - p}d-ray", (*args, "--cluster", "ray"),
                              f"prefill {pre}, decode {dec}, Ray actors", n))
        if native_decode:  # the decode instance on the GGUF's own blocks, the prefill at --dtype
            modes.append(Mode(f"disagg-{p}p{n - p}d-native-decode", (*args, "--decode-weights", "native"),
                              f"prefill {pre}, decode {dec} on native weights", n))
    return modes


# ---- workload ----------------------------------------------------------------------------------


def workload_tag(max_prompt: int, max_output: int) -> str:
    """Names the capped workload in every label and file: 'sharegpt-p512-o64'."""
    return f"sharegpt-p{max_prompt}-o{max_output}"


def cap_specs(specs: list[RequestSpec], max_prompt: int, max_output: int, tok: Tokenizer) -> list[RequestSpec]:
    """Prompts cut to their last `max_prompt` tokens (the latest turns, which the completion answers);
    outputs capped to `max_output` tokens. Shorter requests are unchanged."""
    out = []
    for s in specs:
        ids = s.prompt_ids if s.prompt_ids is not None else tok.encode(s.prompt_text)
        if len(ids) > max_prompt:
            ids = ids[-max_prompt:]
            s = RequestSpec(ids, tok.decode(ids), len(ids), s.output_len)
        out.append(replace(s, output_len=min(s.output_len, max_output)))
    return out


def probe_specs(specs: list[RequestSpec], k: int, tok: Tokenizer) -> list[RequestSpec]:
    """k requests of exactly the workload's mean prompt length (cut from its longer prompts) and its
    longest output: what 'unloaded TTFT for the mean prompt' and 'unloaded TPOT' are measured with."""
    mean_len = max(1, round(statistics.fmean(s.prompt_len for s in specs)))
    out_len = max(s.output_len for s in specs)
    long = [s for s in specs if s.prompt_len >= mean_len and s.prompt_ids is not None]
    out = []
    for i in range(k):
        ids = long[i % len(long)].prompt_ids[-mean_len:]  # type: ignore[index]
        out.append(RequestSpec(ids, tok.decode(ids), mean_len, out_len))
    return out


# ---- SLOs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slos:
    ttft: float  # seconds
    tpot: float
    unloaded_ttft: float  # mean over the probes
    unloaded_tpot: float
    ttft_scale: float
    tpot_scale: float
    source: str  # which server the unloaded numbers come from

    def describe(self) -> str:
        return (f"TTFT SLO {self.ttft:.3f} s = {self.ttft_scale:g} x unloaded mean TTFT {self.unloaded_ttft:.3f} s; "
                f"TPOT SLO {self.tpot:.4f} s = {self.tpot_scale:g} x unloaded mean TPOT {self.unloaded_tpot:.4f} s "
                f"(unloaded: {self.source})")  # fmt: skip


def derive_slos(ttfts: list[float], tpots: list[float], ttft_scale: float, tpot_scale: float, source: str) -> Slos:
    """SLO = scale x the mean unloaded latency. Means, not minima: the SLO should sit above typical noise."""
    if not ttfts or not tpots:
        raise ValueError("need at least one unloaded TTFT and TPOT measurement")
    if ttft_scale <= 0 or tpot_scale <= 0:
        raise ValueError("SLO scales must be > 0")
    t, p = statistics.fmean(ttfts), statistics.fmean(tpots)
    return Slos(ttft_scale * t, tpot_scale * p, t, p, ttft_scale, tpot_scale, source)


# ---- the table ---------------------------------------------------------------------------------


@dataclass
class ModeResult:
    mode: Mode
    goodput: float  # req/s: highest measured rate meeting the attainment target with every lower one (goodput_search)
    runs: dict[float, dict]  # rate -> loadgen summary of that run
    unloaded_ttft: float | None = None
    unloaded_tpot: float | None = None
    unloaded_other_cores: float | None = None  # other processes' CPU use while the unloaded probes ran
    breakdown: dict[float, dict] | None = None  # rate -> server-side means (see breakdown())

    @property
    def per_core(self) -> float:
        return self.goodput / self.mode.cores


def reference_rate(results: list[ModeResult], target: float) -> float | None:
    """The rate to compare tail latencies at: the highest rate every mode measured at which some mode
    still meets the target (where the comparison is informative); else the lowest common rate."""
    common = set.intersection(*(set(r.runs) for r in results)) if results else set()
    if not common:
        return None
    ok = [x for x in common if any(r.runs[x]["attainment_both"] >= target for r in results)]
    return max(ok) if ok else min(common)


def _fmt(x: float | None, unit: float = 1.0, digits: int = 2) -> str:
    return "-" if x is None else f"{x * unit:.{digits}f}"


def markdown_table(results: list[ModeResult], ref_rate: float | None) -> str:
    """mode | devices | cores | goodput | per core | ratio vs colocated | P90 TTFT / TPOT at ref_rate."""
    base = next((r.per_core for r in results if r.mode.name == BASELINE), None)
    ref = "-" if ref_rate is None else f"{ref_rate:g}"
    lines = [
        f"| mode | devices | cores | goodput (req/s) | goodput / core | vs colocated (per core) "
        f"| P90 TTFT @ {ref} req/s (s) | P90 TPOT @ {ref} req/s (ms) | attainment @ {ref} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r.runs.get(ref_rate, {}) if ref_rate is not None else {}
        ratio = f"{r.per_core / base:.2f}x" if base else "-"
        att = "-" if not s else f"{s['attainment_both']:.0%}"
        lines.append(f"| {r.mode.name} | {r.mode.devices} | {r.mode.cores} | {r.goodput:.3g} | {r.per_core:.3g} "
                     f"| {ratio} | {_fmt(s.get('ttft_p90'))} | {_fmt(s.get('tpot_p90'), 1000, 1)} "
                     f"| {att} |")  # fmt: skip
    return "\n".join(lines)


# ---- other processes' CPU use (the machine is shared) ------------------------------------------


@dataclass(frozen=True)
class CpuSample:
    """Seconds of CPU: busy on the whole machine (/proc/stat), and used by this benchmark's processes."""

    wall: float
    busy: float
    ours: float


def proc_stat_busy(line: str, hz: float) -> float:
    """Busy seconds from /proc/stat's 'cpu ...' line: everything but idle and iowait."""
    v = [float(x) for x in line.split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / hz  # user nice system idle iowait irq softirq steal


def pid_cpu(stat: str, hz: float) -> float:
    """utime + stime (all threads) from /proc/PID/stat; the command name may hold spaces, so cut at ')'."""
    rest = stat[stat.rfind(")") + 2 :].split()
    return (float(rest[11]) + float(rest[12])) / hz


def other_cores(before: CpuSample, after: CpuSample) -> float | None:
    """Cores' worth of CPU that processes outside this benchmark used between two samples. Non-zero means
    the measurement shared the CPU with someone else: a colocated instance with 2 threads suffers most."""
    wall = after.wall - before.wall
    if wall <= 0:
        return None
    return max(0.0, ((after.busy - before.busy) - (after.ours - before.ours)) / wall)


# ---- server-side breakdown (GET /metrics) ------------------------------------------------------

_HISTS = {"queueing": "distserve_queueing_seconds", "ttft": "distserve_time_to_first_token_seconds",
          "transfer": "distserve_kv_transfer_seconds", "tpot": "distserve_time_per_output_token_seconds"}  # fmt: skip


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text page (the histograms' _sum and _count among them)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Server-side means over the requests finished between two scrapes: queueing (arrival -> first
    prefill step), prefill (server TTFT - queueing: the prefill batch, including waiting for it inside
    a colocated step), KV transfer, and TPOT (mean decode gap)."""
    means: dict[str, float | None] = {}
    for key, name in _HISTS.items():
        n = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
        s = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
        means[key] = s / n if n > 0 else None
    q, t = means["queueing"], means["ttft"]
    means["prefill"] = t - q if q is not None and t is not None else None
    return means


def breakdown_table(results: list[ModeResult]) -> str:
    lines = ["| mode | rate (req/s) | queueing (s) | prefill (s) | KV transfer (ms) | TPOT (ms) "
             "| client P90 TTFT (s) | client P90 TPOT (ms) | attainment | other processes (cores) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        for rate in sorted(r.runs):
            b, s = (r.breakdown or {}).get(rate, {}), r.runs[rate]
            lines.append(f"| {r.mode.name} | {rate:g} | {_fmt(b.get('queueing'))} | {_fmt(b.get('prefill'))} "
                         f"| {_fmt(b.get('transfer'), 1000)} | {_fmt(b.get('tpot'), 1000, 1)} "
                         f"| {_fmt(s.get('ttft_p90'))} | {_fmt(s.get('tpot_p90'), 1000, 1)} "
                         f"| {s['attainment_both']:.0%} | {_fmt(b.get('other_cores'))} |")  # fmt: skip
    return "\n".join(lines)
