"""Per-request timings at the client and the numbers DistServe judges a system by.

TTFT, TPOT and attainment are defined once for simulated and measured requests
(scheduler/planner/results.py); here, in addition:
  E2E   = last byte of the response - send time
  goodput = the highest rate whose joint (TTFT and TPOT) attainment reaches the target
            (scheduler/planner/goodput_search.py)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from scheduler.planner.results import RequestResult

PERCENTILES = (50, 90, 99)


@dataclass(kw_only=True)
class MeasuredRequest(RequestResult):
    """What the client saw for one request. Times are seconds; start/end are offsets from the run's start.
    finished: the stream ended normally (else `error` says why, and no latency is recorded)."""

    index: int
    send_time: float  # scheduled offset
    start: float = 0.0  # actual offset the request went out at
    end: float = 0.0
    error: str = ""
    e2e: float | None = None
    output_tokens: int = 0  # from the usage chunk when the server sends one, else counted chunks
    itl: list[float] = field(default_factory=list)  # gaps between consecutive token chunks

    def to_dict(self) -> dict:
        """A record of the result files (results-*.json), where `finished` is named "success"."""
        d = asdict(self)
        d["success"] = d.pop("finished")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MeasuredRequest:
        names = {f.name for f in fields(cls)}
        return cls(finished=d.get("success", False), **{k: v for k, v in d.items() if k in names - {"finished"}})


def attainment(results: list[RequestResult], ttft_slo: float | None, tpot_slo: float | None) -> dict[str, float]:
    """Share of all requests meeting the TTFT SLO, the TPOT SLO, and both."""
    n = len(results)
    if n == 0:
        return {"ttft": 0.0, "tpot": 0.0, "both": 0.0}
    a = b = both = 0
    for r in results:
        ok_ttft, ok_tpot = r.meets(ttft_slo, tpot_slo)
        a += ok_ttft
        b += ok_tpot
        both += ok_ttft and ok_tpot
    return {"ttft": a / n, "tpot": b / n, "both": both / n}


def slo_scale_attainment(
    results: list[RequestResult], ttft_slo: float, tpot_slo: float, scales: list[float]
) -> list[dict[str, float]]:
    """Attainment with both SLOs multiplied by each scale, from the same measurements."""
    return [{"scale": s, **attainment(results, ttft_slo * s, tpot_slo * s)} for s in scales]


def _stats(prefix: str, values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    arr = np.asarray(values, dtype=float)
    out[f"{prefix}_mean"] = float(arr.mean()) if arr.size else None
    for p in PERCENTILES:
        out[f"{prefix}_p{p}"] = float(np.percentile(arr, p)) if arr.size else None
    return out


def summarize(results: list[MeasuredRequest], ttft_slo: float | None, tpot_slo: float | None) -> dict:
    """Summary of one run. Latency percentiles are over successful requests; attainment is over all."""
    ok = [r for r in results if r.finished]
    failed = [r for r in results if not r.finished]
    # The run lasts from the first send to the last response; throughput is measured over it.
    duration = (max(r.end for r in results) - min(r.start for r in results)) if results else 0.0
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    summary: dict = {
        "num_requests": len(results),
        "num_success": len(ok),
        "num_failed": len(failed),
        "errors": dict(Counter(r.error for r in failed).most_common(10)),
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_token_throughput": out_tokens / duration if duration > 0 else 0.0,
        "input_token_throughput": in_tokens / duration if duration > 0 else 0.0,
        "mean_prompt_len": float(np.mean([r.prompt_len for r in results])) if results else 0.0,
        "mean_output_len": float(np.mean([r.output_len for r in results])) if results else 0.0,
    }
    summary.update(_stats("ttft", [r.ttft for r in ok if r.ttft is not None]))
    summary.update(_stats("tpot", [r.tpot for r in ok if r.tpot is not None]))
    summary.update(_stats("e2e", [r.e2e for r in ok if r.e2e is not None]))
    summary.update(_stats("itl", [x for r in ok for x in r.itl]))
    summary["ttft_slo"] = ttft_slo
    summary["tpot_slo"] = tpot_slo
    att = attainment(results, ttft_slo, tpot_slo)
    summary["attainment_ttft"] = att["ttft"]
    summary["attainment_tpot"] = att["tpot"]
    summary["attainment_both"] = att["both"]
    return summary
