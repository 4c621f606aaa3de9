"""What the server's handlers share: its config and the per-app state (stored on the app, no module globals)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web

from engine.config import parse_size
from serving.api import EngineClient
from serving.dashboard import LiveWindow
from serving.errors import ApiError
from serving.metrics import ServerMetrics
from serving.responses import Formatter


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    api_key: str | None = None  # None: no authentication
    served_model_name: str | None = None  # None: the engine's model name
    max_body_bytes: int | str = "1MiB"
    grace_period: float = 30.0  # seconds in-flight requests get to finish on SIGINT/SIGTERM
    retry_after: int = 1  # seconds, on 503 (queue full, not ready, draining)
    strict_params: bool = False  # unknown request fields: 400 (OpenAI) instead of ignored with a warning (vLLM)
    default_sampling: dict[str, float] = field(default_factory=dict)  # for fields a request leaves out
    sampling_source: str = ""  # where default_sampling came from (the banner says)
    slo_ttft: float = 1.0  # seconds: the dashboard's default SLO targets
    slo_tpot: float = 0.1

    def __post_init__(self) -> None:
        self.max_body_bytes = parse_size(self.max_body_bytes)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes <= 0 or self.grace_period < 0 or self.retry_after < 0:
            raise ValueError("max_body_bytes must be positive; grace_period and retry_after non-negative")
        if self.slo_ttft <= 0 or self.slo_tpot <= 0:
            raise ValueError(f"SLO targets must be positive, got TTFT {self.slo_ttft}, TPOT {self.slo_tpot}")


@dataclass
class State:
    """Everything the handlers share, stored on the app (no module globals)."""

    engine: EngineClient
    config: ServerConfig
    model: str
    formatter: Formatter
    metrics: ServerMetrics
    phase: str = "starting"  # starting -> ready -> draining
    live: set[str] = field(default_factory=set)  # engine request ids in flight
    handlers: int = 0  # generation handlers running
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    created: int = field(default_factory=lambda: int(time.time()))
    window: LiveWindow = field(default_factory=LiveWindow)  # recent requests, for the dashboard
    warned_fields: set[str] = field(default_factory=set)  # unknown request fields already logged


STATE = web.AppKey("state", State)


def unavailable(message: str, st: State, code: str) -> ApiError:
    return ApiError(503, message, "server_error", None, code, {"Retry-After": str(st.config.retry_after)})

