"""Simulated and measured requests are judged by one rule (scheduler/planner/results.py)."""
from __future__ import annotations

import pytest

from bench.metrics import MeasuredRequest, attainment
from scheduler.planner.simulator import SimResult, SimulatedRequest
from scheduler.planner.workload import SLO

SLOS = SLO(ttft=0.2, tpot=0.01)
# (ttft, tpot, finished): in time; one output token (no TPOT); slow decode; slow first token; cut off mid-stream
CASES = [(0.1, 0.005, True), (0.1, None, True), (0.1, 0.05, True), (0.5, 0.005, True), (0.1, None, False)]


def test_measured_and_simulated_requests_meet_the_same_slos():
    sim = SimResult([SimulatedRequest(prompt_len=8, output_len=4, ttft=t, tpot=p, finished=f, arrival=0.0)
                     for t, p, f in CASES], SLOS, (True, True), 1.0)
    measured = [MeasuredRequest(index=i, prompt_len=8, output_len=4, send_time=0.0, ttft=t, tpot=p, finished=f)
                for i, (t, p, f) in enumerate(CASES)]
    att = attainment(measured, SLOS.ttft, SLOS.tpot)
    assert att == {"ttft": 0.8, "tpot": 0.6, "both": 0.4}
    assert (sim.attainment(True, False), sim.attainment(False, True), sim.joint_attainment) == pytest.approx(
        (att["ttft"], att["tpot"], att["both"]))
    assert [r.meets(SLOS.ttft, SLOS.tpot) for r in sim.requests] == [r.meets(SLOS.ttft, SLOS.tpot) for r in measured]


def test_a_failed_measured_request_meets_neither_slo():
    failed = MeasuredRequest(index=0, prompt_len=8, output_len=4, send_time=0.0, error="HTTP 500")
    assert failed.meets(None, None) == (False, False)


def test_result_file_records_round_trip():
    r = MeasuredRequest(index=3, prompt_len=8, output_len=4, send_time=0.0, finished=True, ttft=0.1, itl=[0.01])
    assert r.to_dict()["success"] is True and MeasuredRequest.from_dict(r.to_dict()) == r
