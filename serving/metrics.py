"""Prometheus metrics, in a per-app registry (tests build several apps in one process).

Exposed at GET /metrics:
  distserve_requests_total{endpoint,status}          HTTP requests by endpoint and status code
  distserve_request_started_total                    engine requests admitted
  distserve_request_finish_total{reason}             engine requests by finish reason (stop|length|abort|error);
                                                     with nothing in flight, the sum equals the started count
  distserve_time_to_first_token_seconds              histogram: arrival -> first token
  distserve_time_per_output_token_seconds            histogram: mean gap between output tokens, per request
  distserve_e2e_request_latency_seconds              histogram: arrival -> finish
  distserve_queueing_seconds                         histogram: arrival -> first prefill step
  distserve_kv_transfer_seconds                      histogram: prefill -> decode KV hand-off (disagg only)
  distserve_kv_transfer_bytes_total                  bytes of KV handed off
  distserve_prompt_tokens_total, distserve_generation_tokens_total
  distserve_kv_blocks_used{instance,role,device}     gauges read from the engine at scrape time
  distserve_kv_blocks_total{instance,role,device}
  distserve_{waiting,prefilling,migrating,running,swapped}_requests{instance,role,device}
                                                     requests by where they are (serving.api.InstanceStats)
  distserve_instance_up{instance,role,device}        1 while in dispatch, 0 once failed or hung
  distserve_instance_faults{instance,role,device}    steps and KV pulls that raised or hung there
  distserve_asyncio_tasks                            tasks on the server's event loop (a leak shows here)
  process_resident_memory_bytes, process_*           the server process (prometheus_client's collector)
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.request import Metrics
from serving.api import InstanceStats

PREFIX = "distserve"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_TRANSFER = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_GAUGES = (("kv_blocks_used", "KV cache blocks in use"), ("kv_blocks_total", "KV cache blocks in the pool"),
           ("waiting", "requests queued for prefill"), ("prefilling", "requests in a prefill step"),
           ("migrating", "requests waiting for their KV to be pulled to this instance"),
           ("running", "requests decoding"), ("swapped", "requests preempted, waiting to resume"),
           ("instance_up", "1 while the instance is in dispatch, 0 once failed or hung"),
           ("instance_faults", "steps and KV pulls that raised or hung on the instance"))


class EngineCollector(Collector):
    """Per-instance gauges straight from engine.stats(), so a scrape never sees stale values."""

    def __init__(self, stats: Callable[[], list[InstanceStats]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rows = self.stats()
        for key, doc in _GAUGES:
            name = f"{PREFIX}_{key}" if key.startswith(("kv", "instance")) else f"{PREFIX}_{key}_requests"
            g = GaugeMetricFamily(name, doc, labels=["instance", "role", "device"])
            for r in rows:
                g.add_metric([r.instance, r.role, r.device], _value(r, key))
            yield g


def _loop_tasks() -> int:
    """Tasks on the running loop (GET /metrics runs on the server's); 0 when scraped off any loop."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0


def _value(r: InstanceStats, key: str) -> float:
    if key == "instance_up":
        return float(r.state == "ok")
    return r.faults if key == "instance_faults" else getattr(r, key)


class ServerMetrics:
    def __init__(self, stats: Callable[[], list[InstanceStats]]) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        p = PREFIX
        self.requests = Counter(f"{p}_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.started = Counter(f"{p}_request_started", "engine requests admitted", registry=r)
        self.finished = Counter(f"{p}_request_finish", "engine requests by finish reason", ["reason"], registry=r)
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "time to first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram(f"{p}_time_per_output_token_seconds", "time per output token", buckets=_TPOT,
                              registry=r)
        self.e2e = Histogram(f"{p}_e2e_request_latency_seconds", "end-to-end latency", buckets=_LATENCY, registry=r)
        self.queueing = Histogram(f"{p}_queueing_seconds", "arrival to first prefill step", buckets=_LATENCY,
                                  registry=r)
        self.transfer = Histogram(f"{p}_kv_transfer_seconds", "KV hand-off time", buckets=_TRANSFER, registry=r)
        self.transfer_bytes = Counter(f"{p}_kv_transfer_bytes", "KV bytes handed off", registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter(f"{p}_generation_tokens", "tokens generated", registry=r)
        r.register(EngineCollector(stats))
        ProcessCollector(registry=r)
        tasks = Gauge(f"{p}_asyncio_tasks", "tasks on the server's event loop", registry=r)
        tasks.set_function(_loop_tasks)

    def observe_finished(self, m: Metrics | None, reason: str, prompt_tokens: int, output_tokens: int) -> None:
        """One engine request finished (any reason): its latencies and token counts."""
        self.finished.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        if m is None:
            return
        for hist, value in ((self.ttft, m.ttft), (self.tpot, m.tpot), (self.queueing, m.queueing),
                            (self.transfer, m.transfer_time)):
            if value is not None:
                hist.observe(value)
        if m.finish is not None:
            self.e2e.observe(m.finish - m.arrival)
        if m.transfer_bytes:
            self.transfer_bytes.inc(m.transfer_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
