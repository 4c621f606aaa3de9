"""The goodput search (scheduler/planner/goodput_search.py), driven by hand-written attainment curves: the
planner's simulator and the load tester's real runs both go through it."""
from __future__ import annotations

import math

import pytest

from scheduler.planner.goodput_search import GoodputSearch, SearchConfig, find_goodput


def test_goodput_search_logic() -> None:
    true_goodput = 7.3
    seen = []

    def measure(rate: float) -> float:
        seen.append(rate)
        return 1.0 if rate <= true_goodput else 0.5

    r = find_goodput(measure, SearchConfig(target=0.9, start_rate=1.0, rel_tol=0.05, max_iterations=50))
    assert seen[:4] == [1.0, 2.0, 4.0, 8.0]  # doubling until a failure, then bisection
    assert true_goodput * 0.95 <= r.goodput <= true_goodput and r.stop_reason == "converged"
    assert r.hi - r.lo <= 0.05 * r.hi

    r = find_goodput(measure, SearchConfig(start_rate=100.0, max_iterations=50))
    assert true_goodput * 0.95 <= r.goodput <= true_goodput  # halving down first
    assert find_goodput(lambda rate: 0.0, SearchConfig(min_rate=0.1, max_iterations=50)).goodput == 0.0
    assert find_goodput(measure, SearchConfig(max_iterations=3)).stop_reason == "max iterations"
    r = find_goodput(measure, SearchConfig(max_requests=500, requests_per_probe=200, max_iterations=50))
    assert len(r.history) == 2 and r.stop_reason == "max requests"
    r = find_goodput(measure, SearchConfig(lo=5.0, hi=10.0, max_iterations=50))
    assert r.history[0] == (5.0, 1.0) and all(5.0 <= x < 10.0 for x, _ in r.history)
    s = GoodputSearch(SearchConfig(max_seconds=10.0, requests_per_probe=100))
    s.record(1.0, 1.0)
    assert s.next_rate() is None and s.stop_reason == "max seconds"  # 100 requests at 2/s > 10 s


def test_bisection_is_geometric_and_doubling_stops_at_max_rate() -> None:
    seen = []

    def measure(rate: float) -> float:
        seen.append(rate)
        return 1.0 if rate <= 7.3 else 0.5

    find_goodput(measure, SearchConfig(rel_tol=0.05, max_iterations=50))
    assert seen[4] == pytest.approx(math.sqrt(4.0 * 8.0))  # pass at 4, fail at 8
    assert seen[5] == pytest.approx(math.sqrt(seen[4] * 8.0))  # seen[4] = 5.66 passed
    wide = GoodputSearch(SearchConfig())
    wide.record(0.1, 1.0)
    wide.record(10.0, 0.0)
    assert wide.next_rate() == pytest.approx(1.0)  # not 5.05: a factor of 10 either side
    r = find_goodput(lambda rate: 1.0, SearchConfig(start_rate=3.0, max_rate=10.0))
    assert [x for x, _ in r.history] == [3.0, 6.0, 10.0] and r.goodput == 10.0
    assert r.stop_reason == "max_rate still meets the target"
    assert find_goodput(lambda rate: 0.9, SearchConfig(max_rate=4.0)).goodput == 4.0  # k/n == target passes


def test_a_good_first_guess_steps_by_growth() -> None:
    # another seed's goodput as the start: step 1.25x to a bracket instead of 2x, fewer probes to converge
    def measure(rate: float) -> float:
        return 1.0 if rate <= 7.3 else 0.5

    near = find_goodput(measure, SearchConfig(start_rate=6.5, growth=1.25, rel_tol=0.04, max_iterations=50))
    far = find_goodput(measure, SearchConfig(start_rate=6.5, rel_tol=0.04, max_iterations=50))
    assert [x for x, _ in near.history[:2]] == pytest.approx([6.5, 8.125])
    assert 7.3 * 0.96 <= near.goodput <= 7.3 and len(near.history) < len(far.history)
    with pytest.raises(ValueError, match="growth"):
        SearchConfig(growth=1.0)


def test_a_noisy_pass_above_a_failure_does_not_count() -> None:
    """A recorded sweep (serving_compare seeds the search with it) can pass at 0.5 and 1.5 and fail at 1:
    goodput is a rate that it and every lower rate meet, so 0.5, and the search bisects 0.5..1."""
    s = GoodputSearch(SearchConfig(target=0.9, max_iterations=10))
    for rate, att in ((0.5, 0.95), (1.0, 0.75), (1.5, 0.92), (2.0, 0.4)):
        s.record(rate, att)
    assert (s.lo, s.hi) == (0.5, 1.0) and s.result().goodput == 0.5
    assert s.next_rate() == pytest.approx(math.sqrt(0.5))
    s.record(math.sqrt(0.5), 0.91)
    assert s.lo == pytest.approx(math.sqrt(0.5)) and s.hi == 1.0
