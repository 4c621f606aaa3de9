"""Torch's OpenMP threads and the threads that start them.

libgomp (the OpenMP runtime of torch's CPU wheels) keeps the worker pool a thread creates for as long as that
thread lives, and once the process holds more OpenMP threads than it has CPUs, it all but stops spin-waiting
at barriers (GOMP's throttled spin count): each parallel op then parks and wakes its workers through the
kernel. An instance's pinned thread runs hundreds of small ops per step, so a pool left behind by the main
thread made every step of a 2-core instance ~2x slower (bench/RESULTS.md, "Engine vs llama.cpp"). Torch work
at start-up (loading, building models and pools) therefore runs on a short-lived thread whose pool goes with it.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def off_main_thread(fn: Callable[[], T]) -> T:
    """fn() on a short-lived thread (it exits before this returns), its result returned, its exception raised."""
    with ThreadPoolExecutor(1, thread_name_prefix="startup") as pool:
        return pool.submit(fn).result()
