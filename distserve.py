"""The `distserve` command (installed by `pip install -e .`; also `python -m distserve`): one entry to every tool.

    distserve serve [server flags]                  the OpenAI-compatible server (python server.py)
    distserve bench [loadgen flags]                 the load tester against any server (python -m bench.loadgen)
    distserve bench NAME [flags]                    a benchmark: engine transfer interference serving simulator
                                                    interop slo-sensitivity plots loadgen
    distserve plan [placement flags]                the placement search (python -m scheduler.planner.placement)
    distserve simulate [flags]                      the cluster simulator (python -m scheduler.simulate)
    distserve profile [flags]                       the engine's latency model (python -m scheduler.planner.profile)

Each subcommand takes exactly the flags of the module it runs (`distserve plan --help`). Files they write go
under out/ unless you say otherwise (plan: out/plan.json, profile: out/profile.json, loadgen: out/loadgen/).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

BENCHES = {"loadgen": "bench.loadgen", "engine": "bench.engine_bench", "transfer": "bench.transfer_bench",
           "interference": "bench.interference_bench", "serving": "bench.serving_compare",
           "simulator": "bench.simulator_fidelity", "interop": "bench.interop",
           "slo-sensitivity": "bench.slo_sensitivity", "plots": "bench.plots"}
COMMANDS = {"serve": "server", "plan": "scheduler.planner.placement", "simulate": "scheduler.simulate",
            "profile": "scheduler.planner.profile"}


def _run(module: str, argv: list[str], prog: str) -> int:
    if importlib.util.find_spec(module) is None:
        print(f"distserve: {prog} needs the module {module}, which this checkout does not have yet", file=sys.stderr)
        return 2
    mod = importlib.import_module(module)
    main = getattr(mod, "main", None)
    if main is None:
        print(f"distserve: {module} has no main(argv) to run", file=sys.stderr)
        return 2
    sys.argv = [prog, *argv]  # --help and errors name the command the user typed
    rc = main(argv)
    return rc if isinstance(rc, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        if rest and rest[0] in BENCHES:
            return _run(BENCHES[rest[0]], rest[1:], f"distserve bench {rest[0]}")
        if rest and not rest[0].startswith("-"):
            print(f"distserve: unknown benchmark {rest[0]!r}; one of: {', '.join(BENCHES)}", file=sys.stderr)
            return 2
        return _run(BENCHES["loadgen"], rest, "distserve bench")
    if cmd not in COMMANDS:
        print(f"distserve: unknown command {cmd!r}; one of: {', '.join(COMMANDS)}, bench (distserve --help)",
              file=sys.stderr)
        return 2
    return _run(COMMANDS[cmd], rest, f"distserve {cmd}")


if __name__ == "__main__":
    sys.exit(main())
