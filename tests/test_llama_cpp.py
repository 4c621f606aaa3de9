"""The llama.cpp anchor's plumbing without building anything: its commands, its parsing, its caching."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench import llama_cpp


class Done:
    def __init__(self, stdout: str = "", returncode: int = 0) -> None:
        self.stdout, self.returncode = stdout, returncode


def test_prefill_and_decode_parse_the_tools_output(monkeypatch, tmp_path):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        if Path(cmd[0]).name == "llama-bench":
            return Done(json.dumps([{"n_prompt": 512, "n_gen": 0, "avg_ts": 900.5, "stddev_ts": 3.0}]))
        rows = [{"pp": 32, "tg": 64, "pl": b, "speed_pp": 100.0 * b, "speed_tg": 80.0 * b} for b in (1, 8)]
        return Done("main: stuff\n" + "\n".join(json.dumps(r) for r in rows))

    monkeypatch.setattr(subprocess, "run", fake_run)
    pre = llama_cpp.prefill("m.gguf", [0, 1], 512, cache=tmp_path)
    dec = llama_cpp.decode("m.gguf", [0, 1], (1, 8), 32, 64, cache=tmp_path)
    assert pre["tok_s"] == 900.5 and "-p 512 -n 0" in pre["command"] and "-t 2" in pre["command"]
    assert dec["decode"]["8"] == {"batch": 8, "tok_s": 640.0, "prompt_tok_s": 800.0}
    assert "-npl 1,8" in dec["command"] and "-ntg 64" in dec["command"]
    assert all(str(tmp_path) in c[0] for c in calls)


def test_same_weight_copies_are_made_once(monkeypatch, tmp_path):
    made = []

    def fake_run(cmd, check=False):
        made.append(cmd)
        Path(cmd[-2]).write_bytes(b"gguf")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert llama_cpp.model_for("native", "/x/model.Q4_1.gguf", tmp_path) == "/x/model.Q4_1.gguf"
    first = llama_cpp.model_for("bfloat16", "/x/model.Q4_1.gguf", tmp_path)
    again = llama_cpp.model_for("bfloat16", "/x/model.Q4_1.gguf", tmp_path)
    assert first == again and first.endswith("model.Q4_1.BF16.gguf") and len(made) == 1
    assert made[0][1:3] == ["--allow-requantize", "/x/model.Q4_1.gguf"] and made[0][-1] == "BF16"


def test_existing_working_tools_are_not_rebuilt(monkeypatch, tmp_path):
    for t in llama_cpp.TOOLS:
        (tmp_path / "build" / "bin").mkdir(parents=True, exist_ok=True)
        (tmp_path / "build" / "bin" / t).write_text("")
    ran = []
    monkeypatch.setattr(llama_cpp, "_run", lambda cmd: ran.append(cmd))
    monkeypatch.setattr(llama_cpp, "_smoke", lambda model, cache: 0)
    assert llama_cpp.ensure_built(tmp_path, model="m.gguf") == tmp_path / "build" / "bin"
    assert ran == []


def test_an_avx2_only_build_names_its_extensions_in_its_own_folder(monkeypatch, tmp_path):
    """`make bench-engine ARGS=--isa avx2` (a CPU without AVX-512, emulated): llama.cpp built without
    -march=native, AVX2/FMA/F16C on, every AVX-512 and AMX option off, beside the native build."""
    ran = []
    monkeypatch.setattr(llama_cpp, "_run", lambda cmd: ran.append(cmd))
    monkeypatch.setattr(llama_cpp, "_source", lambda cache: tmp_path / "src")
    cache = tmp_path / "isa-avx2"
    llama_cpp.ensure_built(cache, isa="avx2")
    configure = ran[0]
    assert configure[configure.index("-B") + 1] == str(cache / "build")
    for on in ("GGML_AVX2", "GGML_FMA", "GGML_F16C"):
        assert f"-D{on}=ON" in configure
    for off in ("GGML_NATIVE", "GGML_AVX512", "GGML_AVX512_BF16", "GGML_AVX512_VNNI", "GGML_AMX_TILE"):
        assert f"-D{off}=OFF" in configure
    assert llama_cpp.cache_for("avx2") != llama_cpp.cache_for(None)


def test_engine_bench_caps_every_library_at_avx2():
    from bench.engine_bench import isa_env

    env = isa_env("avx2")
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert env["MKL_ENABLE_INSTRUCTIONS"] == "AVX2" and env["DISTSERVE_KERNEL_MARCH"] == "haswell"
    assert isa_env(None) == {}
