"""The live dashboard: GET /dashboard (one self-contained page, no CDN) polls GET /dashboard/data every second.

The data is the goodput picture DistServe is about, over a sliding window of recently finished requests:
TTFT and TPOT percentiles, the share meeting each SLO and both (failed and aborted requests count as misses,
as in bench/metrics.py), request and token rates, and per instance its queue, batch and KV cache use. SLO
targets come from the server's flags and can be changed per page (?ttft_slo=&tpot_slo=, seconds).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import orjson
from aiohttp import web

from engine.request import Metrics
from serving.api import EngineClient

PAGE = Path(__file__).with_name("static") / "dashboard.html"


@dataclass
class _Done:
    at: float  # time.monotonic() when it finished
    ok: bool  # finished normally (stop or length)
    ttft: float | None
    tpot: float | None  # None: one output token (no decode phase: meets any TPOT SLO)
    tokens: int


class LiveWindow:
    """Arrivals and finished engine requests of the last `seconds`, for live percentiles and rates."""

    def __init__(self, seconds: float = 60.0, max_kept: int = 20_000) -> None:
        self.seconds = seconds
        self.started = time.monotonic()
        self.done: deque[_Done] = deque(maxlen=max_kept)
        self.arrivals: deque[float] = deque(maxlen=max_kept)
        self.total_finished = 0

    def arrived(self) -> None:
        self.arrivals.append(time.monotonic())

    def observe(self, m: Metrics | None, reason: str, output_tokens: int) -> None:
        self.total_finished += 1
        ok = m is not None and reason in ("stop", "length")
        self.done.append(_Done(time.monotonic(), ok, m.ttft if m else None, m.tpot if m else None, output_tokens))

    def _trim(self, now: float) -> None:
        for q, when in ((self.done, lambda d: d.at), (self.arrivals, lambda t: t)):
            while q and when(q[0]) < now - self.seconds:
                q.popleft()

    def snapshot(self, ttft_slo: float, tpot_slo: float, now: float | None = None) -> dict:
        now = time.monotonic() if now is None else now
        self._trim(now)
        span = max(min(self.seconds, now - self.started), 1e-9)  # a young server: rates over its lifetime
        done = list(self.done)
        ok = [d for d in done if d.ok]
        ttft = [d.ttft for d in ok if d.ttft is not None]
        tpot = [d.tpot if d.tpot is not None else 0.0 for d in ok]
        meet_ttft = [d.ok and d.ttft is not None and d.ttft <= ttft_slo for d in done]
        meet_tpot = [d.ok and (d.tpot or 0.0) <= tpot_slo for d in done]
        n = len(done)
        return {
            "window_s": self.seconds,
            "slo": {"ttft_s": ttft_slo, "tpot_s": tpot_slo},
            "finished": n,
            "failed": n - len(ok),
            "total_finished": self.total_finished,
            "request_rate": len(self.arrivals) / span,
            "finish_rate": n / span,
            "output_tokens_per_s": sum(d.tokens for d in ok) / span,
            "ttft_ms": _percentiles(ttft),
            "tpot_ms": _percentiles(tpot),
            "attainment": None if not n else {
                "ttft": sum(meet_ttft) / n, "tpot": sum(meet_tpot) / n,
                "both": sum(a and b for a, b in zip(meet_ttft, meet_tpot, strict=True)) / n},
        }


def _percentiles(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50": None, "p90": None, "p99": None}
    p = np.percentile(np.asarray(seconds) * 1000.0, (50, 90, 99))
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2])}


def instance_rows(engine: EngineClient) -> list[dict]:
    """engine.stats() per instance, plus the batch of the step it is running now and KV use as a share."""
    return [asdict(s) | {"step_batch": s.in_step, "kv_use": s.kv_blocks_used / (s.kv_blocks_total or 1)}
            for s in engine.stats()]


def _seconds(request: web.Request, name: str, default: float) -> float:
    try:
        v = float(request.query.get(name, default))
    except ValueError:
        return default
    return v if v > 0 else default


def handlers(state_key: web.AppKey):
    """The two routes; state_key reaches the app's State (engine, config, window, live requests)."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=PAGE.read_bytes(), content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def data(request: web.Request) -> web.Response:
        st = request.app[state_key]
        ttft_slo = _seconds(request, "ttft_slo", st.config.slo_ttft)
        tpot_slo = _seconds(request, "tpot_slo", st.config.slo_tpot)
        mode = st.engine.config.mode
        doc = {"time": time.time(), "model": st.model, "mode": mode, "phase": st.phase, "in_flight": len(st.live),
               **st.window.snapshot(ttft_slo, tpot_slo), "instances": instance_rows(st.engine)}
        return web.Response(body=orjson.dumps(doc), content_type="application/json",
                            headers={"Cache-Control": "no-cache"})

    return page, data
