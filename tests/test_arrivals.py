"""Arrival generators: the mean rate and the burstiness (CV of the gaps) are what they claim."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.planner.workload import ArrivalSpec, arrival_gaps, send_times

N = 20_000


@pytest.mark.parametrize(
    ("text", "cv"), [("poisson", 1.0), ("gamma:0.5", 0.5), ("gamma:2", 2.0), ("gamma:1", 1.0), ("fixed", 0.0)]
)
def test_gaps_have_the_right_mean_and_cv(text: str, cv: float) -> None:
    rate = 4.0
    gaps = arrival_gaps(ArrivalSpec.parse(text), rate, N, seed=1)
    mean = gaps.mean()
    # Standard error of the mean is cv/(rate*sqrt(N)): <= 1.5% for cv <= 2; 4% leaves room.
    assert mean == pytest.approx(1 / rate, rel=0.04)
    assert gaps.std() / mean == pytest.approx(cv, abs=0.06 * max(cv, 1.0))
    assert (gaps >= 0).all()


def test_send_times_start_at_zero_and_span_n_minus_one_gaps() -> None:
    t = send_times(ArrivalSpec.parse("fixed"), 2.0, 5, seed=0)
    assert t == [0.0, 0.5, 1.0, 1.5, 2.0]
    p = send_times(ArrivalSpec.parse("poisson"), 10.0, N, seed=3)
    assert p[0] == 0.0 and all(b >= a for a, b in zip(p, p[1:], strict=False))
    assert (N - 1) / p[-1] == pytest.approx(10.0, rel=0.04)


def test_seeded_and_reproducible() -> None:
    spec = ArrivalSpec.parse("gamma:3")
    assert send_times(spec, 1.0, 100, seed=7) == send_times(spec, 1.0, 100, seed=7)
    assert send_times(spec, 1.0, 100, seed=7) != send_times(spec, 1.0, 100, seed=8)


def test_parse_rejects_bad_specs() -> None:
    assert str(ArrivalSpec.parse("gamma:2")) == "gamma:2"
    for bad in ("gamma", "gamma:0", "uniform", "poisson:2"):
        with pytest.raises(ValueError):
            ArrivalSpec.parse(bad)
    with pytest.raises(ValueError):
        arrival_gaps(ArrivalSpec("poisson"), 0.0, 10, seed=0)
    assert np.array_equal(arrival_gaps(ArrivalSpec("fixed"), 4.0, 3, 0), [0.25, 0.25, 0.25])
