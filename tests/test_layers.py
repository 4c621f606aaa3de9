"""The packages form layers (docs/ARCHITECTURE.md): each imports only from the layers below it, so there is
no import cycle and the runtime never depends on the planner, the server or the benchmarks."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package -> the project packages it may import (besides itself)
ALLOWED = {
    "engine": set(),
    "transfer": {"engine"},
    "scheduler.runtime": {"engine"},
    # the one upward edge, lazy: the planner's CLI reads real datasets (ShareGPT, HumanEval) through the load
    # tester's loaders, which need a tokenizer and the dataset packages
    "scheduler.planner": {"engine", "scheduler.runtime", "transfer", "bench.datasets"},
    "scheduler.simulate": {"engine", "scheduler.runtime", "scheduler.planner"},  # the one-layout CLI, on the planner
    "serving": {"engine", "scheduler.runtime", "transfer"},
    "server": {"engine", "serving"},
}
PACKAGES = ("engine", "transfer", "scheduler.runtime", "scheduler.planner", "scheduler.simulate", "serving", "server",
            "bench.datasets", "bench", "tests")


def layer_of(module: str) -> str | None:
    for p in sorted(PACKAGES, key=len, reverse=True):
        if module == p or module.startswith(p + "."):
            return p
    return None


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_each_package_imports_only_the_layers_below_it():
    wrong = []
    for path in [ROOT / "server.py", *ROOT.glob("engine/*.py"), *ROOT.glob("transfer/*.py"),
                 *ROOT.glob("scheduler/**/*.py"), *ROOT.glob("serving/*.py")]:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        here = layer_of(module)
        for imp in imports(path):
            there = layer_of(imp)
            if here is not None and there is not None and there != here and there not in ALLOWED[here]:
                wrong.append(f"{path.relative_to(ROOT)} imports {imp}")
    assert not wrong, "\n".join(wrong)


def test_every_cuda_test_carries_the_cuda_marker():
    """`make test-gpu` runs `pytest -m cuda`: a test that skips without CUDA but lacks the marker would never run
    on the day a GPU machine is lent."""
    unmarked = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                marks = [ast.unparse(d) for d in node.decorator_list]
                if any("cuda" in m and "skipif" in m for m in marks) and "pytest.mark.cuda" not in marks:
                    unmarked.append(f"{path.name}::{node.name}")
    assert not unmarked, unmarked
