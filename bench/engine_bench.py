"""Our engine against Hugging Face transformers and llama.cpp on the default model, in one run, every
figure as a ratio.

    python -m bench.engine_bench                     # the precisions this machine runs fast, all cores
    python -m bench.engine_bench --precisions bfloat16,native --repeat 3 --markdown --out engine.json
    python -m bench.engine_bench --quick --systems ours,hf   # fewer tokens: a smoke run
    python -m bench.engine_bench --isa avx2 --repeat 3       # as on a CPU without AVX-512 (emulated here)

Precisions: bfloat16 and float32 (dense weights; transformers and llama.cpp's BF16 / F32 copies of the
same GGUF) and native (ours: the GGUF's own Q4_1 / Q8_0 blocks; llama.cpp: the file itself;
transformers: float32 on the dequantized weights, as the accuracy reference). Default: bfloat16,
float32, native where the CPU has AVX-512 BF16, else float32, native.

Measures prefill (1 x 512 and 4 x 512 tokens) and decode (batch 1, 8, 32; 32-token prompts, 64 new
tokens, greedy) for each system, plus the machine's matmul peak and memory bandwidth (for MFU and
the decode bandwidth limit) and each system's memory. Each system runs in its own subprocess
(`--worker ours|hf|llama|machine --json`), pinned to the same cores with the same thread count, so that
memory is per system and nothing is shared; with --repeat > 1 the systems take turns in a rotating
order (interleaved rounds) and the median of each figure is kept. Timing definitions are in
bench/engine_bench_workers.py; llama.cpp is built on first use by bench/llama_cpp.py.
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
    p.add_argument("--precisions", "--dtypes", dest="precisions", default="auto",
                   help="comma-separated of bfloat16, float32, native (default auto: what this CPU runs fast)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "native"], help=argparse.SUPPRESS)
    p.add_argument("--systems", default="ours,hf,llama", help="comma-separated of ours, hf, llama")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="our decode steps compiled (default) or eager")
    p.add_argument("--threads", type=int, default=None, help="cores/threads for both systems (default: all)")
    p.add_argument("--isa", choices=["avx2"], default=None,
                   help="emulate a CPU without AVX-512 on this one: torch, oneDNN and MKL capped at AVX2 (their own "
                        "switches), our kernels and llama.cpp built for AVX2 only; precisions float32, native")
    p.add_argument("--repeat", type=int, default=1, help="worker runs per system, interleaved; median kept")
    p.add_argument("--iters", type=int, default=None, help="timed runs per measurement inside a worker (fastest)")
    p.add_argument("--quick", action="store_true", help="fewer tokens, for smoke tests")
    p.add_argument("--model", default=None, help="checkpoint path (default: the packaged SmolLM2 GGUF)")
    p.add_argument("--out", default=None, help="write every figure and the raw results as JSON")
    p.add_argument("--markdown", action="store_true", help="also print a table for bench/RESULTS.md")
    p.add_argument("--worker", choices=["ours", "hf", "llama", "machine"], help=argparse.SUPPRESS)
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
    w = workload(args)
    if args.worker == "llama":
        from bench.engine_bench_workers import run_llama
        from engine.loader import default_model_path

        return run_llama(args.model or default_model_path(), args.dtype, cores, w, isa=args.isa)
    ckpt = load_checkpoint(args.model)
    config = asdict(ckpt.config)
    if args.worker == "machine":
        dtype = DTYPES["float32" if args.dtype == "native" else args.dtype]
        return {"config": config, "peaks": {"dtype": args.dtype, **machine_peaks(ckpt.config, dtype, args.quick)}}
    return {"config": config, "workload": asdict(w),
            **run_worker(args.worker, ckpt, args.dtype, cores, w, compile=args.compile)}


def run_sub(args: argparse.Namespace, worker: str, dtype: str) -> dict:
    cmd = [sys.executable, "-m", "bench.engine_bench", "--worker", worker, "--dtype", dtype, "--json"]
    cmd += ["--threads", str(len(cores_for(args.threads)))] + (["--quick"] if args.quick else [])
    cmd += (["--iters", str(args.iters)] if args.iters else []) + (["--model", args.model] if args.model else [])
    cmd += ([] if args.compile else ["--no-compile"]) + (["--isa", args.isa] if args.isa else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **isa_env(args.isa)})
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker {worker} ({dtype}) failed with exit code {proc.returncode}")
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{"))
    print(f"  {worker:8s} {dtype:9s} {time.perf_counter() - t0:6.1f} s", file=sys.stderr, flush=True)
    return json.loads(line)


def isa_env(isa: str | None) -> dict[str, str]:
    """A worker's environment for an emulated instruction set: each library's documented cap
    (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS) and our kernels' -march."""
    if isa != "avx2":
        return {}
    return {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "DISTSERVE_KERNEL_MARCH": "haswell"}


def resolve(args: argparse.Namespace) -> list[str]:
    from engine.precision import cpu_has_bf16

    if args.precisions == "auto":
        return ["bfloat16", "float32", "native"] if cpu_has_bf16() and not args.isa else ["float32", "native"]
    out = [p.strip() for p in args.precisions.split(",")]
    bad = [p for p in out if p not in ("bfloat16", "float32", "native")]
    if bad:
        raise SystemExit(f"unknown precision {bad}: use bfloat16, float32, native")
    return list(dict.fromkeys(out))


def bench_precision(args: argparse.Namespace, precision: str) -> dict:
    from bench import engine_bench_report as rep
    from engine.config import ModelConfig

    systems = [s for s in ("ours", "hf", "llama") if s in args.systems.split(",")]
    machine = run_sub(args, "machine", precision)
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for r in range(args.repeat):  # rotate the order so that no system always runs first or last
        for system in systems[r % len(systems):] + systems[:r % len(systems)]:
            runs[system].append(run_sub(args, system, precision))
    peaks = rep.best_peaks([machine["peaks"], run_sub(args, "machine", precision)["peaks"]])
    med = {s: rep.median_tree(v) for s, v in runs.items()}
    cfg = ModelConfig(**machine["config"])
    rows = rep.rows(cfg, med["ours"], med.get("hf"), peaks, med.get("llama"), precision)
    return {"dtype": precision, "peaks": peaks, "rows": [r.as_dict() for r in rows], **med, "runs": runs,
            "_rows": rows}


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
    emulating = ""
    if args.isa:
        info["emulated_isa"] = f"{args.isa} only ({', '.join(f'{k}={v}' for k, v in isa_env(args.isa).items())})"
        emulating = f", emulating {info['emulated_isa']}"
    print(f"engine bench: {info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
          f"transformers {info['transformers']}{emulating}", file=sys.stderr)
    results = [bench_precision(args, d) for d in resolve(args)]
    for res in results:
        print(f"\n== {res['dtype']} ==")
        print("\n".join(rep.machine_lines(res["peaks"])))
        print(rep.text_table(res["_rows"]))
    if args.markdown:
        print(f"\n### Engine vs transformers and llama.cpp ({date})\n\n`{command.strip()}` on {info['cpu']}, "
              f"{info['threads']} threads, torch {info['torch']}, transformers {info['transformers']}{emulating}; "
              "ratios = ours / transformers and ours / llama.cpp.")
        for res in results:
            print(f"\n**{res['dtype']}** — " + "; ".join(rep.machine_lines(res["peaks"])) + "\n")
            print(rep.markdown_table(res["_rows"]))
    if args.out:
        doc = {"command": command, "date": date, "machine": info, "workload": results[0]["ours"].get("workload"),
               "results": [{k: v for k, v in r.items() if k != "_rows"} for r in results]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))
        print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
