"""One line per HTTP request: who, what, status, latency, and for generations the tokens and TTFT.

    127.0.0.1 "POST /v1/chat/completions" 200 1.84s prompt=31 completion=16 ttft=0.21s finish=length id=chatcmpl-…
    127.0.0.1 "POST /v1/completions" 400 0.00s error="'temperature' must be in [0.0, 2.0], got 3"

Polling endpoints (/health, /metrics, the dashboard) log at DEBUG, so a dashboard left open does not
drown the lines that matter.
"""
from __future__ import annotations

import logging

from aiohttp import web

from serving.responses import usage

log = logging.getLogger("distserve.access")
ACCESS = web.RequestKey("access", dict)  # what the generation handler knows: request id, its choices
QUIET = ("/health", "/metrics", "/dashboard")


def line(request: web.Request, status: int, seconds: float, error: str | None = None) -> str:
    parts = [request.remote or "-", f'"{request.method} {request.path}"', str(status), f"{seconds:.2f}s"]
    info = request.get(ACCESS)
    if info is not None:
        choices = info["choices"]
        u = usage(choices, info["prompts"])  # n > 1 choices share their prompt
        parts += [f"prompt={u['prompt_tokens']}", f"completion={u['completion_tokens']}"]
        ttfts = [c.metrics.ttft for c in choices if c.metrics is not None and c.metrics.ttft is not None]
        if ttfts:
            parts.append(f"ttft={min(ttfts):.2f}s")
        reasons = sorted({c.finish_reason or "abort" for c in choices})
        parts += [f"finish={','.join(reasons)}", f"id={info['id']}"]
    if error:
        parts.append(f'error="{error}"')
    return " ".join(parts)


def record(request: web.Request, status: int, seconds: float, error: str | None = None) -> None:
    level = logging.DEBUG if request.path.startswith(QUIET) and status < 400 else logging.INFO
    if log.isEnabledFor(level):
        log.log(level, line(request, status, seconds, error))
