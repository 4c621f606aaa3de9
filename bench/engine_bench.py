"""Our engine against Hugging Face transformers on the default model, in one run, every figure as a ratio.

    python -m bench.engine_bench                     # dtype the engine picks (auto), all cores
    python -m bench.engine_bench --dtypes float32,bfloat16 --repeat 3 --markdown --out engine.json
    python -m bench.engine_bench --quick             # fewer tokens: a smoke run

Measures prefill (1 x 512 and 4 x 512 tokens) and decode (batch 1, 8, 32; 32-token prompts, 64 new
tokens, greedy) for both systems, plus the machine's matmul peak and memory bandwidth (for MFU and
the decode bandwidth limit) and each system's memory. Each system runs in its own subprocess
(`--worker ours|hf|machine --json`), pinned to the same cores with the same thread count, so that
memory is per system and nothing is shared; with --repeat > 1 the systems alternate and the median
of each figure is kept. Timing definitions are in bench/engine_bench_workers.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--dtypes", default=None, help="comma-separated, e.g. float32,bfloat16 (overrides --dtype)")
    p.add_argument("--threads", type=int, default=None, help="cores/threads for both systems (default: all)")
    p.add_argument("--repeat", type=int, default=1, help="worker runs per system, interleaved; median kept")
    p.add_argument("--iters", type=int, default=None, help="timed runs per measurement inside a worker (fastest)")
    p.add_argument("--quick", action="store_true", help="fewer tokens, for smoke tests")
    p.add_argument("--model", default=None, help="checkpoint path (default: the packaged SmolLM2 GGUF)")
    p.add_argument("--out", default=None, help="write every figure and the raw results as JSON")
    p.add_argument("--markdown", action="store_true", help="also print a table for bench/RESULTS.md")
    p.add_argument("--worker", choices=["ours", "hf", "machine"], help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads is not None and not 1 <= args.threads <= len(os.sched_getaffinity(0)):
        p.error(f"--threads must be in 1..{len(os.sched_getaffinity(0))}")
    if args.repeat < 1 or (args.iters is not None and args.iters < 1):
        p.error("--repeat and --iters must be at least 1")
    return args


def cores_for(threads: int | None) -> list[int]:
    cores = sorted(os.sched_getaffinity(0))
    return cores[:threads] if threads else cores


def workload(args: argparse.Namespace):
    from bench.engine_bench_workers import Workload

    w = Workload.quick() if args.quick else Workload()
    if args.iters:
        w.iters = args.iters
    return w


def worker_main(args: argparse.Namespace) -> dict:
    import torch

    from bench.engine_bench_machine import machine_peaks
    from bench.engine_bench_workers import DTYPES, run_worker
    from engine.loader import load_checkpoint

    cores = cores_for(args.threads)
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    ckpt = load_checkpoint(args.model)
    config = asdict(ckpt.config)
    if args.worker == "machine":
        return {"config": config, "peaks": {"dtype": args.dtype, **machine_peaks(ckpt.config, DTYPES[args.dtype],
                                                                              args.quick)}}
    w = workload(args)
    return {"config": config, "workload": asdict(w), **run_worker(args.worker, ckpt, args.dtype, cores, w)}


def run_sub(args: argparse.Namespace, worker: str, dtype: str) -> dict:
    cmd = [sys.executable, "-m", "bench.engine_bench", "--worker", worker, "--dtype", dtype, "--json"]
    cmd += ["--threads", str(len(cores_for(args.threads)))] + (["--quick"] if args.quick else [])
    cmd += (["--iters", str(args.iters)] if args.iters else []) + (["--model", args.model] if args.model else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker {worker} ({dtype}) failed with exit code {proc.returncode}")
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{"))
    print(f"  {worker:8s} {dtype:9s} {time.perf_counter() - t0:6.1f} s", file=sys.stderr, flush=True)
    return json.loads(line)


def resolve(args: argparse.Namespace) -> list[str]:
    names = args.dtypes.split(",") if args.dtypes else [args.dtype]
    out = []
    for name in names:
        if name == "auto":
            import torch

            from engine.instance import resolve_dtype
            name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[resolve_dtype("auto", torch.device("cpu"))]
        if name not in ("float32", "bfloat16"):
            raise SystemExit(f"unknown dtype {name!r}: use float32, bfloat16 or auto")
        out.append(name)
    return list(dict.fromkeys(out))


def bench_dtype(args: argparse.Namespace, dtype: str) -> dict:
    from bench import engine_bench_report as rep
    from engine.config import ModelConfig

    machine = run_sub(args, "machine", dtype)
    runs: dict[str, list[dict]] = {"ours": [], "hf": []}
    for r in range(args.repeat):  # alternate the order so neither system always runs second
        for system in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
            runs[system].append(run_sub(args, system, dtype))
    peaks = rep.best_peaks([machine["peaks"], run_sub(args, "machine", dtype)["peaks"]])
    ours, hf = rep.median_tree(runs["ours"]), rep.median_tree(runs["hf"])
    cfg = ModelConfig(**machine["config"])
    rows = rep.rows(cfg, ours, hf, peaks)
    return {"dtype": dtype, "peaks": peaks, "rows": [r.as_dict() for r in rows], "ours": ours, "hf": hf,
            "runs": runs, "_rows": rows}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        result = worker_main(args)
        print(json.dumps(result) if args.json else json.dumps(result, indent=1))
        return
    import transformers

    from bench import engine_bench_report as rep
    from bench.engine_bench_machine import machine_info

    command = "python -m bench.engine_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    info = {**machine_info(), "threads": len(cores_for(args.threads)), "transformers": transformers.__version__}
    date = time.strftime("%Y-%m-%d %H:%M")
    print(f"engine bench: {info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
          f"transformers {info['transformers']}", file=sys.stderr)
    results = [bench_dtype(args, d) for d in resolve(args)]
    for res in results:
        print(f"\n== {res['dtype']} ==")
        print("\n".join(rep.machine_lines(res["peaks"])))
        print(rep.text_table(res["_rows"]))
    if args.markdown:
        print(f"\n### Engine vs transformers ({date})\n\n`{command.strip()}` on {info['cpu']}, {info['threads']} "
              f"threads, torch {info['torch']}, transformers {info['transformers']}; ratio = ours / transformers.")
        for res in results:
            print(f"\n**{res['dtype']}** — " + "; ".join(rep.machine_lines(res["peaks"])) + "\n")
            print(rep.markdown_table(res["_rows"]))
    if args.out:
        doc = {"command": command, "date": date, "machine": info, "workload": results[0]["ours"].get("workload"),
               "results": [{k: v for k, v in r.items() if k != "_rows"} for r in results]}
        Path(args.out).write_text(json.dumps(doc, indent=1))
        print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
