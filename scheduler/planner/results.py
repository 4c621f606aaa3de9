"""One request's latencies and whether they meet the SLOs: one definition for the requests the
simulator runs (simulator.SimulatedRequest) and the requests the load tester measures at the client
(bench.metrics.MeasuredRequest).

Definitions (DistServe):
  TTFT  = first token - arrival (simulated) or send time (measured)
  TPOT  = (last token - first token) / (output tokens - 1); none for a one-token output, which has no
          decode phase and so meets any TPOT SLO
  attainment of an SLO = share of ALL requests meeting it; a request that did not finish misses the
  TPOT SLO, one without a first token misses both
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class RequestResult:
    prompt_len: int
    output_len: int  # requested output tokens
    ttft: float | None = None  # seconds; None: no first token
    tpot: float | None = None  # seconds; None: one output token, or not finished
    finished: bool = False  # every output token arrived (a failed or cut-off request did not finish)

    def meets(self, ttft_slo: float | None, tpot_slo: float | None) -> tuple[bool, bool]:
        """(meets the TTFT SLO, meets the TPOT SLO); None as an SLO means unconstrained."""
        ok_ttft = self.ttft is not None and (ttft_slo is None or self.ttft <= ttft_slo)
        ok_tpot = self.finished and (tpot_slo is None or self.tpot is None or self.tpot <= tpot_slo)
        return ok_ttft, ok_tpot


def tpot_of(first: float, last: float, output_tokens: int) -> float | None:
    """DistServe's TPOT from the first and last token times; None for one output token (as
    engine.request.RequestMetrics.tpot)."""
    if output_tokens <= 1:
        return None
    return (last - first) / (output_tokens - 1)
