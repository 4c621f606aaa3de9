"""Arrival processes: when each of N requests is sent, as offsets in seconds from the start.

poisson      exponential gaps (CV 1), the paper's default
gamma:CV     gamma gaps with shape 1/CV^2 and mean 1/rate; CV > 1 is burstier than Poisson
fixed        evenly spaced gaps of exactly 1/rate
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ArrivalSpec:
    kind: str  # "poisson" | "gamma" | "fixed"
    cv: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("poisson", "gamma", "fixed"):
            raise ValueError(f"unknown arrival process {self.kind!r} (poisson | gamma:CV | fixed)")
        if self.cv <= 0:
            raise ValueError(f"gamma CV must be > 0, got {self.cv}")

    @classmethod
    def parse(cls, text: str) -> ArrivalSpec:
        """'poisson' | 'fixed' | 'gamma:CV'."""
        kind, _, arg = text.partition(":")
        if kind == "gamma":
            if not arg:
                raise ValueError("gamma needs a CV, e.g. gamma:2")
            return cls("gamma", float(arg))
        if arg:
            raise ValueError(f"{kind} takes no argument: {text!r}")
        return cls(kind)

    def __str__(self) -> str:
        return f"gamma:{self.cv:g}" if self.kind == "gamma" else self.kind


def arrival_gaps(spec: ArrivalSpec, rate: float, n: int, seed: int) -> np.ndarray:
    """n inter-arrival gaps (seconds) with mean 1/rate."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    mean = 1.0 / rate
    if spec.kind == "fixed":
        return np.full(n, mean)
    rng = np.random.default_rng(seed)
    if spec.kind == "poisson":
        return rng.exponential(mean, n)
    # Gamma with shape k and scale theta has mean k*theta and CV 1/sqrt(k).
    shape = 1.0 / (spec.cv**2)
    return rng.gamma(shape, mean / shape, n)


def send_times(spec: ArrivalSpec, rate: float, n: int, seed: int) -> list[float]:
    """Absolute send offsets for n requests; the first request goes out at t=0."""
    if n <= 0:
        return []
    gaps = arrival_gaps(spec, rate, n, seed)
    # The first request is sent at once; a run's length is then the sum of n-1 gaps, so the
    # offered rate over the run equals `rate` on average.
    offsets = np.concatenate(([0.0], np.cumsum(gaps[: n - 1])))
    return [float(x) for x in offsets]
