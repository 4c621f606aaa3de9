"""The README's commands, run as written: the offline example from another directory, the placement search on
DistServe's A100 profile writing a plan the server accepts, and the one-layout simulation of the shipped request
file (paths made absolute, the working directory a temporary one). The client snippet runs in
tests/test_server.py; make interop runs the load tester."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def command(prefix: str) -> list[str]:
    """The README's shell command starting with prefix, continuation lines joined, comment dropped."""
    text = README.replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith(prefix))
    return shlex.split(line.split("  #")[0])


def test_offline_example_runs_from_any_directory(tmp_path):
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "from serving import LLM" in b)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text, reason, ttft = out.stdout.rsplit(" ", 2)
    assert "Paris" in text and reason == "length" and float(ttft) > 0


def test_placement_example_writes_a_plan_the_server_accepts(tmp_path, monkeypatch):
    """On the machine the plan is for: four GPUs (this one has none, so torch is told it has four)."""
    import torch

    from serving.plan import load_plan

    argv = command(".venv/bin/distserve plan")[2:]
    argv = [str(ROOT / a) if a.startswith("scheduler/") else a for a in argv]
    out = subprocess.run([sys.executable, str(ROOT / "distserve.py"), "plan", *argv], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "best:" in out.stdout and "wrote out/plan.json" in out.stdout
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    layout = load_plan(str(tmp_path / "out" / "plan.json"))  # what server.py --plan reads (raises if refused)
    devices = layout.get("prefill_devices") or layout.get("devices")
    assert devices and all(d.startswith("cuda:") for d in devices), plan


def test_simulate_example_judges_every_request_of_the_shipped_file(tmp_path):
    argv = command(".venv/bin/distserve simulate")[2:]
    argv = [str(ROOT / a) if a.startswith("scheduler/") else a for a in argv]
    out = subprocess.run([sys.executable, str(ROOT / "distserve.py"), "simulate", *argv], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    shipped = json.loads((ROOT / "scheduler/planner/data/example-requests.json").read_text())
    assert [r["prompt_len"] for r in res["requests"]] == [r["prompt_len"] for r in shipped]
    both = sum(r["ttft"] <= 0.25 and r["tpot"] is not None and r["tpot"] <= 0.1 for r in res["requests"])
    assert res["attainment"]["both"] == pytest.approx(both / len(shipped))
