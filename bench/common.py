"""Shared bits of the benchmarks: machine description and small timing helpers."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def machine() -> str:
    from bench.engine_bench_machine import machine_info

    m = machine_info()
    return f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['python']}"


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def today() -> str:
    return time.strftime("%Y-%m-%d")
