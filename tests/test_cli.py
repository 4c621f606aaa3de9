"""The `distserve` command: each subcommand reaches its module with the user's flags, outputs default to out/."""
from __future__ import annotations

import tomllib

import pytest

import distserve


def test_console_script_is_declared(request):
    meta = tomllib.loads((request.config.rootpath / "pyproject.toml").read_text())
    assert meta["project"]["scripts"] == {"distserve": "distserve:main"}
    assert set(distserve.COMMANDS) == {"serve", "plan", "simulate", "profile"}


@pytest.mark.parametrize("argv, flag", [(["serve", "--help"], "--strict-params"), (["bench", "--help"], "--dataset"),
                                        (["bench", "interop", "--help"], "--checks"),
                                        (["plan", "--help"], "--ttft-slo"), (["simulate", "--help"], "--requests")])
def test_subcommands_run_their_module(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        distserve.main(argv)
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage:") and flag in out


def test_a_module_not_there_yet_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setitem(distserve.COMMANDS, "simulate", "scheduler.no_such_module")
    assert distserve.main(["simulate", "--rate", "1"]) == 2
    assert "needs the module scheduler.no_such_module" in capsys.readouterr().err
    assert distserve.main(["frobnicate"]) == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err
    assert distserve.main(["bench", "nope"]) == 2 and "unknown benchmark 'nope'" in capsys.readouterr().err


def test_plan_and_profile_write_under_out_unless_told(capsys):
    """Nothing lands untracked in the repo root: both write under out/ by default (README's paths)."""
    from scheduler.planner import placement, profile

    for mod, path in ((placement, "out/plan.json"), (profile, "out/profile.json")):
        with pytest.raises(SystemExit):
            mod.main(["--help"])
        assert f"(default: {path})" in " ".join(capsys.readouterr().out.split())
