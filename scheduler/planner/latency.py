"""Latency models for the planner: DistServe's formulas, fitted by least squares, and the profile file.

Profile file (JSON), one model on one kind of device. Our engine's profiler writes it; DistServe's
published A100 files are read into the same structure (`load_profile`):

    {
      "model": "facebook/opt-13b",
      "device": "A100-80GB",             # free text, for people
      "device_kind": "cuda",             # "cuda": instances use GPUs; "cpu": instances use core sets
      "tp": {                            # per tensor-parallel degree, milliseconds
        "1": {"prefill": [a, b, c],              # a + b*sum(l) + c*sum(l^2), l = prompt lengths
              "decoding_smallbs": [a, b, c],     # a + b*sum(context) + c*batch, batch < threshold
              "decoding_largebs": [a, b, c],     # the same, batch >= threshold
              "decoding_large_small_bs_threshold": 95}
      },
      "kv_capacity_tokens": {"1x1": 66144, "1x2": 163008},   # per instance, keyed "TPxPP";
                                          # or one int: per device, scaled by tp*pp
      "kv_bytes_per_token": 819200,       # K+V over all layers: what a hand-off moves per token
      "transfer_bandwidth_Bps": 3e11,     # prefill -> decode KV link (bytes/s)
      "swap_bandwidth_Bps": 2.5e10,       # device <-> host link for decode swapping (bytes/s)
      "block_size": 16,
      "scheduler": {"max_num_seqs": 256}, # optional SchedulerConfig defaults for this device
      "interference": {"prefill": 1.3, "decode": 1.6}  # optional: step-time factor while another
                                          # instance of the same process is busy (CPU instances are
                                          # threads of one process: GIL, memory bandwidth); default 1
      "step_noise": {"prefill": [0.97, 1.02, 1.31, ...], "decode": [...]}  # optional: measured / modelled
                                          # step time of traced steps; the simulator multiplies each
                                          # step by one drawn at random (seeded). Default: none, every
                                          # step exactly as modelled (DistServe's simulator)
      "precision": {"dtype": "bfloat16", "weights": "dense"},  # optional: the engine settings profiled
      "arrival_stall_ms": {"prefill": 2.5, "decode": 3.5}  # optional: ms a step in flight grows by per
                                          # request that arrives meanwhile (the front end's HTTP work
                                          # on the event loop of the same process competes with the
                                          # instances' threads for the GIL and the cores); default none
                                          # (a GPU's steps do not wait for the host's front end)
    }

With pipeline degree pp, each time below is what ONE stage of the pipeline spends on the batch: the
whole time divided by pp, plus pp ms for a prefill (1 ms at pp=1) and nothing for a decode, exactly as
DistServe's simulator prices every stage worker (simdistserve/estimators/time_estimator.py:
`delay * (1/pp) + pp_const`, pp_const = pp for get_prefill_time and 0 for get_decode_time). A batch
passes through the pp stages in turn, so its latency is pp times the stage time, while the stages work
on pp batches at once (scheduler/planner/simulator.py drives the stages).
A mixed (chunked) step is priced as one forward: the prefill formula over the chunks, where a chunk
of n new tokens after c cached ones counts n^2 + 2*n*c for the quadratic term (attention pairs: that
sums to l^2 over a whole prompt cut into chunks), plus the decode formula's per-token terms
b*sum(context) + c*batch (its constant a is shared with the prefill's, so counted once).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

# KV bytes per token of the models in DistServe's data (fp16 K and V: 2 * 2 bytes * layers * hidden).
_OPT_SHAPES = {"facebook/opt-13b": (40, 5120), "facebook/opt-66b": (64, 9216), "facebook/opt-175b": (96, 12288)}
A100_NVLINK_BPS = 3.0e11  # NVLink 3, one direction, nominal
PCIE4_BPS = 2.5e10  # host link for swapping, x16 effective


@dataclass
class PhaseCoeffs:
    """DistServe's per-tp coefficients (milliseconds)."""

    prefill: tuple[float, float, float]
    decode_small: tuple[float, float, float]
    decode_large: tuple[float, float, float]
    threshold: int = 95

    def __post_init__(self) -> None:
        for name in ("prefill", "decode_small", "decode_large"):
            v = tuple(float(x) for x in getattr(self, name))
            if len(v) != 3:
                raise ValueError(f"{name} needs 3 coefficients [a, b, c], got {v}")
            setattr(self, name, v)
        if self.threshold < 1:
            raise ValueError(f"decode batch threshold must be >= 1, got {self.threshold}")

    @classmethod
    def from_json(cls, d: dict) -> PhaseCoeffs:
        return cls(d["prefill"], d["decoding_smallbs"], d["decoding_largebs"],
                   int(d.get("decoding_large_small_bs_threshold", 95)))

    def to_json(self) -> dict:
        return {"prefill": list(self.prefill), "decoding_smallbs": list(self.decode_small),
                "decoding_largebs": list(self.decode_large), "decoding_large_small_bs_threshold": self.threshold}


@dataclass
class Profile:
    model: str
    device: str
    device_kind: str  # "cuda" | "cpu"
    tp: dict[int, PhaseCoeffs]
    kv_capacity_tokens: dict[tuple[int, int], int] | int
    kv_bytes_per_token: int
    transfer_bandwidth_Bps: float = A100_NVLINK_BPS
    swap_bandwidth_Bps: float = PCIE4_BPS
    block_size: int = 16
    scheduler: dict = field(default_factory=dict)
    interference: dict[str, float] = field(default_factory=dict)  # phase -> factor (see the file's top)
    step_noise: dict[str, tuple[float, ...]] = field(default_factory=dict)  # phase -> multipliers (file's top)
    arrival_stall_ms: dict[str, float] = field(default_factory=dict)  # phase -> ms per arrival (file's top)
    # decode instances of another precision than the prefill's (phases()): their own KV capacity; None: as above
    decode_kv_capacity_tokens: dict[tuple[int, int], int] | int | None = None
    # the engine settings profiled, as server flags ({"dtype": "bfloat16", "weights": "dense"}, and after phases()
    # decode_dtype / decode_weights): a plan carries them to server.py --plan. Empty: not known (DistServe's files)
    precision: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.device_kind not in ("cuda", "cpu"):
            raise ValueError(f"device_kind must be 'cuda' or 'cpu', got {self.device_kind!r}")
        if not self.tp:
            raise ValueError("profile has no tensor-parallel entries")
        if self.kv_bytes_per_token <= 0 or self.transfer_bandwidth_Bps <= 0 or self.swap_bandwidth_Bps <= 0:
            raise ValueError("kv_bytes_per_token and bandwidths must be positive")

    def kv_capacity(self, tp: int, pp: int, role: str = "prefill") -> int | None:
        """KV tokens one (tp, pp) instance of `role` holds; None when the profile does not cover that layout."""
        cap = self.kv_capacity_tokens
        if role == "decode" and self.decode_kv_capacity_tokens is not None:
            cap = self.decode_kv_capacity_tokens
        if isinstance(cap, int):
            return cap * tp * pp
        return cap.get((tp, pp))

    def layouts(self, max_devices: int) -> list[tuple[int, int]]:
        """(tp, pp) pairs with coefficients and a KV capacity, using at most max_devices devices."""
        out = []
        for tp in sorted(self.tp):
            for pp in range(1, max_devices // tp + 1):
                cap = self.kv_capacity(tp, pp)
                if cap:
                    out.append((tp, pp))
        return out

    def model_for(self, tp: int, pp: int) -> LatencyModel:
        return LatencyModel(self.tp[tp], pp)

    def to_json(self) -> dict:
        cap = self.kv_capacity_tokens
        return {"model": self.model, "device": self.device, "device_kind": self.device_kind,
                "tp": {str(k): v.to_json() for k, v in sorted(self.tp.items())},
                "kv_capacity_tokens": cap if isinstance(cap, int) else {f"{t}x{p}": n for (t, p), n in cap.items()},
                "kv_bytes_per_token": self.kv_bytes_per_token, "transfer_bandwidth_Bps": self.transfer_bandwidth_Bps,
                "swap_bandwidth_Bps": self.swap_bandwidth_Bps, "block_size": self.block_size,
                "scheduler": self.scheduler, "interference": self.interference,
                **({"step_noise": {k: list(v) for k, v in self.step_noise.items()}} if self.step_noise else {}),
                **({"arrival_stall_ms": self.arrival_stall_ms} if self.arrival_stall_ms else {}),
                **({"precision": self.precision} if self.precision else {})}


def phases(prefill: Profile, decode: Profile) -> Profile:
    """One profile that prices each phase from its own engine: a disaggregated server whose decode instances run
    another precision than its prefill ones (server.py --decode-weights; profile each with
    scheduler/planner/profile.py). Prefill coefficients, the hand-off's bytes per token and the links from
    `prefill`; decode coefficients and the decode instances' KV capacity from `decode`; each phase's
    interference, step noise and arrival stall from its own profile. (The colocated baselines run one precision:
    price them with a profile of their own.)"""
    tps = sorted(set(prefill.tp) & set(decode.tp))
    if not tps:
        raise ValueError(f"the profiles share no tensor-parallel degree: {sorted(prefill.tp)} vs {sorted(decode.tp)}")
    if prefill.device_kind != decode.device_kind or prefill.block_size != decode.block_size:
        raise ValueError("the prefill and decode profiles must be of one kind of device and KV block size")
    tp = {t: PhaseCoeffs(prefill.tp[t].prefill, decode.tp[t].decode_small, decode.tp[t].decode_large,
                         decode.tp[t].threshold) for t in tps}

    def own(name: str) -> dict:  # a per-phase dict: each phase's entry from its own profile
        ours = {k: v for k, v in getattr(prefill, name).items() if k == "prefill"}
        return ours | {k: v for k, v in getattr(decode, name).items() if k == "decode"}
    return replace(prefill, model=f"{prefill.model} (decode: {decode.model})", tp=tp,
                   decode_kv_capacity_tokens=decode.kv_capacity_tokens, interference=own("interference"),
                   step_noise=own("step_noise"), arrival_stall_ms=own("arrival_stall_ms"),
                   precision=prefill.precision | {f"decode_{k}": v for k, v in decode.precision.items()})


class LatencyModel:
    """Per-stage step times in milliseconds for one instance layout (coefficients of its tp; the time a
    batch holds each of its pp pipeline stages, so its latency is pp times this)."""

    def __init__(self, coeffs: PhaseCoeffs, pp: int = 1) -> None:
        self.c = coeffs
        self.pp = pp

    def prefill_ms(self, lengths: list[int]) -> float:
        a, b, c = self.c.prefill
        return (a + b * sum(lengths) + c * sum(n * n for n in lengths)) / self.pp + self.pp

    def decode_ms(self, sum_context: int, batch: int) -> float:
        a, b, c = self.c.decode_small if batch < self.c.threshold else self.c.decode_large
        return (a + b * sum_context + c * batch) / self.pp

    def mixed_ms(self, chunks: list[tuple[int, int]], sum_context: int, batch: int) -> float:
        """chunks: (new tokens n, cached tokens c) per prompt chunk; plus `batch` decodes over sum_context."""
        if not chunks:
            return self.decode_ms(sum_context, batch)
        a, b, c = self.c.prefill
        t = a + b * sum(n for n, _ in chunks) + c * sum(n * n + 2 * n * k for n, k in chunks)
        if batch:
            _, bd, cd = self.c.decode_small if batch < self.c.threshold else self.c.decode_large
            t += bd * sum_context + cd * batch
        return t / self.pp + self.pp


# ---- fitting -------------------------------------------------------------------------------------

@dataclass
class Fit:
    coeffs: tuple[float, float, float]
    mean_rel_error: float
    max_rel_error: float
    num_samples: int


def _lstsq(x: np.ndarray, y: np.ndarray) -> Fit:
    # Minimize relative, not absolute, error (rows scaled by 1/y): SLOs judge every size alike, and an
    # absolute fit lets a few long batches pull the constant term negative, mispricing short prompts.
    w = 1.0 / np.maximum(np.abs(y), 1e-9)
    coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    rel = np.abs(x @ coef - y) / np.maximum(np.abs(y), 1e-9)
    return Fit(tuple(float(v) for v in coef), float(rel.mean()), float(rel.max()), len(y))


def fit_prefill(samples: list[tuple[list[int], float]]) -> Fit:
    """samples: (prompt lengths of a batch, measured ms). Needs >= 3 batches of varied shape."""
    if len(samples) < 3:
        raise ValueError("fit_prefill needs at least 3 samples")
    x = np.array([[1.0, sum(ls), sum(n * n for n in ls)] for ls, _ in samples])
    return _lstsq(x, np.array([t for _, t in samples], dtype=float))


def fit_decode(samples: list[tuple[int, int, float]], threshold: int = 95) -> tuple[Fit, Fit]:
    """samples: (sum of contexts, batch size, ms). Fits below and at/above `threshold` separately; a
    side without 3 samples borrows the other's fit (the profiler may not reach large batches)."""
    def one(rows: list[tuple[int, int, float]]) -> Fit | None:
        if len(rows) < 3:
            return None
        x = np.array([[1.0, s, b] for s, b, _ in rows], dtype=float)
        return _lstsq(x, np.array([t for *_, t in rows], dtype=float))

    small = one([r for r in samples if r[1] < threshold])
    large = one([r for r in samples if r[1] >= threshold])
    if small is None and large is None:
        raise ValueError("fit_decode needs at least 3 samples")
    return small or large, large or small


def fit_coeffs(prefill: list[tuple[list[int], float]], decode: list[tuple[int, int, float]],
               threshold: int = 95) -> tuple[PhaseCoeffs, dict]:
    """Coefficients for one tp degree and a report of the fit's relative errors."""
    p = fit_prefill(prefill)
    ds, dl = fit_decode(decode, threshold)
    report = {name: {"mean_rel_error": f.mean_rel_error, "max_rel_error": f.max_rel_error, "samples": f.num_samples}
              for name, f in (("prefill", p), ("decoding_smallbs", ds), ("decoding_largebs", dl))}
    return PhaseCoeffs(p.coeffs, ds.coeffs, dl.coeffs, threshold), report


# ---- reading -------------------------------------------------------------------------------------

def _parse_capacity(cap: dict | int) -> dict[tuple[int, int], int] | int:
    if isinstance(cap, int):
        return cap
    out = {}
    for key, n in cap.items():
        tp, _, pp = key.partition("x")
        out[(int(tp), int(pp or 1))] = int(n)
    return out


def read_max_num_tokens(path: Path, model: str) -> dict[tuple[int, int], int]:
    """DistServe's max_num_tokens.csv -> {(tp, pp): KV tokens} for one model."""
    with open(path) as f:
        return {(int(r["tp"]), int(r["pp"])): int(r["max_num_tokens"]) for r in csv.DictReader(f)
                if r["model"] == model}


def load_profile(path: str | Path, model: str | None = None) -> Profile:
    """Our profile format, or a DistServe profile file (model -> tp -> coefficients) with its
    max_num_tokens.csv beside it."""
    path = Path(path)
    data = json.loads(path.read_text())
    if "tp" in data:
        return Profile(model=data["model"], device=data.get("device", "?"),
                       device_kind=data.get("device_kind", "cuda"),
                       tp={int(k): PhaseCoeffs.from_json(v) for k, v in data["tp"].items()},
                       kv_capacity_tokens=_parse_capacity(data["kv_capacity_tokens"]),
                       kv_bytes_per_token=int(data["kv_bytes_per_token"]),
                       transfer_bandwidth_Bps=float(data.get("transfer_bandwidth_Bps", A100_NVLINK_BPS)),
                       swap_bandwidth_Bps=float(data.get("swap_bandwidth_Bps", PCIE4_BPS)),
                       block_size=int(data.get("block_size", 16)), scheduler=dict(data.get("scheduler", {})),
                       interference={k: float(v) for k, v in data.get("interference", {}).items()},
                       step_noise={k: tuple(map(float, v)) for k, v in data.get("step_noise", {}).items()},
                       arrival_stall_ms={k: float(v) for k, v in data.get("arrival_stall_ms", {}).items()},
                       precision={k: str(v) for k, v in data.get("precision", {}).items()})
    if model is None:
        if len(data) != 1:
            raise ValueError(f"{path} holds several models ({', '.join(data)}); pass --model")
        model = next(iter(data))
    if model not in data:
        raise ValueError(f"{path} has no model {model!r}; it has {', '.join(data)}")
    if model not in _OPT_SHAPES:
        raise ValueError(f"no KV shape known for {model!r}")
    layers, hidden = _OPT_SHAPES[model]
    csv_path = path.parent / "max_num_tokens.csv"
    if not csv_path.exists():
        raise FileNotFoundError(f"DistServe profile needs {csv_path} for KV capacities")
    return Profile(model=model, device="A100-80GB (DistServe published)", device_kind="cuda",
                   tp={int(k): PhaseCoeffs.from_json(v) for k, v in data[model].items()},
                   kv_capacity_tokens=read_max_num_tokens(csv_path, model),
                   kv_bytes_per_token=2 * 2 * layers * hidden,
                   # DistServe's batch limits (REFERENCE.md): decode batches well past the 95 threshold
                   scheduler={"max_num_seqs": 256, "max_prefill_seqs": 128, "max_prefill_tokens": 8192})
