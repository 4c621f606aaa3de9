"""Interop with software nobody here wrote: a real client against our server, our load tester against other servers.

Not part of `make test` (a few minutes; needs guidellm and llama.cpp's llama-server). `make interop` runs it.

  python -m bench.interop [--checks guidellm,mock,llama] [--requests 8] [--out out/interop]
  python -m bench.interop --capture tests/data/client_payloads.json

checks (each must finish with zero failed requests):
  guidellm  guidellm (vLLM's load tester) against our server: /v1/completions and /v1/chat/completions, streamed,
            synthetic text prompts of 64 tokens, 16 output tokens with ignore_eos (the vLLM extensions it sends)
  mock      our loadgen against guidellm's mock server (text only), completions and chat
  llama     our loadgen against llama.cpp's llama-server on the bundled GGUF, completions and chat
--capture records the exact request bodies guidellm and our loadgen send, against a recording server; the
payload tests in tests/test_server.py replay them.

guidellm is not in requirements-dev.txt: it pins multidict and click below the versions this venv has and pulls
pandas, pyarrow, datasets and sanic. It goes into its own venv (--guidellm-venv, default .cache/guidellm-venv),
which sees this venv's packages through a .pth file (torch, transformers: no second copy), installed on first
use. llama-server: built from llama.cpp's source (see bench/RESULTS.md, engine speed) at --llama-server
(default .cache/llama/build/bin/llama-server); the check is skipped, saying so, when it is absent.
Every server here listens on 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def say(msg: str) -> None:
    print(f"[interop] {msg}", flush=True)


# ---------------- tools ----------------
def ensure_guidellm(venv: Path) -> Path:
    """The guidellm command, installed into its own venv layered over this one on first use."""
    exe = venv / "bin" / "guidellm"
    if exe.exists():
        return exe
    say(f"installing guidellm into {venv} (first use; its pins conflict with this venv, see the module doc)")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    purelib = Path(subprocess.check_output([str(venv / "bin" / "python"), "-c",
                                            "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                           text=True).strip())
    # after its own site-packages: guidellm's pins win inside its venv, everything else comes from ours
    (purelib / "zz_distserve_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                    "--progress-bar", "off", "guidellm"], check=True)
    return exe


def hf_tokenizer_dir(out: Path, model: str | None = None) -> Path:
    """The served model's tokenizer as a HF directory (tokenizer.json + config), which guidellm loads offline."""
    from engine.loader import load_tokenizer

    tok = load_tokenizer(model)
    out.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
           "chat_template": tok.chat_template, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running(cmd: list[str], ready_url: str, log: Path, timeout: float = 300.0, env: dict | None = None):
    """A server subprocess, up when ready_url answers 200; stopped (SIGTERM, then kill) on exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while not _ok(ready_url):
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} not ready after {timeout:.0f} s; see {log}")
            time.sleep(0.5)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def our_server(port: int, log: Path):
    cmd = [sys.executable, "server.py", "--host", HOST, "--port", str(port)]
    return running(cmd, f"http://{HOST}:{port}/health", log)


def guidellm_run(exe: Path, url: str, endpoint: str, tok_dir: Path, out_json: Path, requests: int,
                 rate: float, prompt_tokens: int = 64, output_tokens: int = 16) -> dict:
    """One guidellm benchmark; returns its request totals (successful, errored, incomplete, total)."""
    cmd = [str(exe), "run", "--backend", f"kind=openai_http,target={url},request_format={endpoint}",
           "--profile", f"kind=constant,rate={rate}", "--constraint", f"kind=max_requests,count={requests}",
           "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
           "--tokenizer", f"kind=huggingface_auto,model={tok_dir}", "--output", f"kind=json,path={out_json}",
           "--disable-console-interactive"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = out_json.with_suffix(".log")
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=900).returncode
    if rc != 0 or not out_json.exists():
        return {"successful": 0, "errored": requests, "incomplete": 0, "total": requests,
                "error": f"guidellm exited {rc}; see {log}"}
    doc = json.loads(out_json.read_text())
    return doc["benchmarks"][0]["metrics"]["request_totals"]


def loadgen_run(url: str, endpoint: str, out: Path, requests: int, rate: float, dataset: str = "fixed:64:16") -> dict:
    """Our load tester (text prompts, its defaults) against url; returns the run's summary."""
    from bench.loadgen import main as loadgen

    rc = loadgen(["--url", url, "--dataset", dataset, "--num-requests", str(requests), "--rate", str(rate),
                  "--endpoint", endpoint, "--out", str(out), "--no-plots", "--no-progress", "--ttft-slo", "5",
                  "--tpot-slo", "1"])
    summary = json.loads((out / "summary.json").read_text())["runs"][0]
    return {"rc": rc, "num_requests": summary["num_requests"], "num_failed": summary["num_failed"],
            "errors": summary["errors"], "ttft_p50_ms": _ms(summary["ttft_p50"]),
            "tpot_p50_ms": _ms(summary["tpot_p50"])}


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


# ---------------- the checks ----------------
def check_guidellm(args) -> dict:
    exe = ensure_guidellm(Path(args.guidellm_venv))
    tok = hf_tokenizer_dir(Path(args.out) / "tokenizer")
    port = free_port()
    url = f"http://{HOST}:{port}"
    results = {}
    say(f"guidellm -> our server at {url} (loading the model first)")
    with our_server(port, Path(args.out) / "guidellm-server.log"):
        for ep in ENDPOINTS:
            t = guidellm_run(exe, url, ep, tok, Path(args.out) / f"guidellm{ep.replace('/', '-')}.json",
                             args.requests, args.rate)
            results[ep] = t
            say(f"  guidellm {ep}: {t['successful']}/{t['total']} successful, {t['errored']} errored, "
                f"{t['incomplete']} incomplete")
    # guidellm's own count may stop one short of max_requests at the end of a constant-rate run: what counts is
    # that every request it made succeeded
    ok = all(t["errored"] == 0 and t["incomplete"] == 0 and t["successful"] == t["total"] > 0
             for t in results.values())
    return {"ok": ok, "runs": results}


def check_mock(args) -> dict:
    exe = ensure_guidellm(Path(args.guidellm_venv))
    port = free_port()
    url = f"http://{HOST}:{port}"
    cmd = [str(exe), "mock-server", "--host", HOST, "--port", str(port), "--model", "guidellm-mock",
           "--ttft-ms", "20", "--itl-ms", "5"]
    say(f"our loadgen -> guidellm's mock server at {url}")
    return loadgen_against(args, cmd, url, "mock", timeout=120)


def loadgen_against(args, cmd: list[str], url: str, tag: str, timeout: float) -> dict:
    """Start another server (cmd), run our loadgen against its completions and chat endpoints."""
    results = {}
    with running(cmd, f"{url}/health", Path(args.out) / f"{tag}-server.log", timeout=timeout):
        for ep in ("completions", "chat"):
            results[ep] = r = loadgen_run(url, ep, Path(args.out) / f"loadgen-{tag}-{ep}", args.requests, args.rate)
            say(f"  loadgen {ep}: {r['num_requests'] - r['num_failed']}/{r['num_requests']} ok {r['errors'] or ''}")
    return {"ok": all(r["num_failed"] == 0 and r["rc"] == 0 for r in results.values()), "runs": results}


def check_llama(args) -> dict:
    exe = Path(args.llama_server)
    if not exe.is_absolute():
        exe = ROOT / exe
    if not exe.exists():
        msg = f"llama-server not found at {exe} (build llama.cpp's tools/server, or pass --llama-server PATH)"
        say(f"skipped: {msg}")
        return {"ok": None, "skipped": msg}
    from engine.loader import default_model_path

    port = free_port()
    url = f"http://{HOST}:{port}"
    # --no-repack: a native build on an AMX CPU repacks weights for AMX tiles, which this sandbox's kernel
    # refuses (SIGILL on tilezero); without repacking it runs AVX-512
    cmd = [str(exe), "-m", default_model_path(), "--host", HOST, "--port", str(port), "-c", "4096", "-np", "4",
           "-t", str(len(os.sched_getaffinity(0))), "--no-repack"]
    say(f"our loadgen -> llama.cpp's llama-server at {url}")
    return loadgen_against(args, cmd, url, "llama", timeout=300)


CHECKS = {"guidellm": check_guidellm, "mock": check_mock, "llama": check_llama}


# ---------------- capturing what clients send ----------------
class Recorder:
    """A minimal OpenAI-style streaming server that keeps every generation request's path and body."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", lambda r: web.json_response({"status": "ok"}))
        app.router.add_get("/v1/models", lambda r: web.json_response(
            {"object": "list", "data": [{"id": "recorded-model", "object": "model"}]}))
        for ep in ENDPOINTS:
            app.router.add_post(ep, self.generate)
        return app

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append({"path": request.path, "body": body})
        n = body.get("max_completion_tokens") or body.get("max_tokens") or 4
        chat = request.path.endswith("chat/completions")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for j in range(n):
            choice = {"index": 0, "delta": {"content": f" t{j}"}} if chat else {"index": 0, "text": f" t{j}"}
            choice["finish_reason"] = "length" if j == n - 1 else None
            usage = {"prompt_tokens": 8, "completion_tokens": j + 1, "total_tokens": j + 9}
            await resp.write(b"data: " + json.dumps({"id": "r", "choices": [choice], "usage": usage}).encode()
                             + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


async def capture(args) -> int:
    rec = Recorder()
    runner = web.AppRunner(rec.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port).start()
    url = f"http://{HOST}:{port}"
    out = Path(args.out)
    payloads: dict = {"_": "request bodies as each client sent them (python -m bench.interop --capture)"}
    try:
        exe = ensure_guidellm(Path(args.guidellm_venv))
        tok = hf_tokenizer_dir(out / "tokenizer")
        version = "guidellm " + subprocess.check_output([str(exe), "--version"], text=True).split()[-1]
        for ep in ENDPOINTS:
            rec.seen.clear()
            await asyncio.to_thread(guidellm_run, exe, url, ep, tok, out / f"capture{ep.replace('/', '-')}.json",
                                    1, 1.0, 16, 4)
            payloads.setdefault(version, {})[ep] = rec.seen[0]["body"]
        for ep in ("completions", "chat"):
            rec.seen.clear()
            await asyncio.to_thread(loadgen_run, url, ep, out / f"capture-loadgen-{ep}", 1, 1.0, "fixed:16:4")
            payloads.setdefault("bench.loadgen", {})[rec.seen[0]["path"]] = rec.seen[0]["body"]
    finally:
        await runner.cleanup()
    Path(args.capture).write_text(json.dumps(payloads, indent=1) + "\n")
    say(f"wrote {args.capture}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.interop", description=__doc__.split("\n")[0])
    p.add_argument("--checks", default="guidellm,mock,llama", help="comma-separated: " + ",".join(CHECKS))
    p.add_argument("--requests", type=int, default=8, help="requests per run")
    p.add_argument("--rate", type=float, default=2.0, help="requests per second")
    p.add_argument("--out", default="out/interop")
    p.add_argument("--guidellm-venv", default=str(ROOT / ".cache" / "guidellm-venv"))
    p.add_argument("--llama-server", default=".cache/llama/build/bin/llama-server")
    p.add_argument("--capture", metavar="JSON", help="record the clients' request bodies into JSON and exit")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.capture:
        return asyncio.run(capture(args))
    summary = {"date": time.strftime("%Y-%m-%d %H:%M"), "requests": args.requests, "rate": args.rate, "checks": {}}
    for name in args.checks.split(","):
        try:
            summary["checks"][name] = CHECKS[name](args)
        except Exception as e:  # one broken tool must not hide the other results
            summary["checks"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            say(f"{name}: FAILED: {e}")
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    for name, r in summary["checks"].items():
        verdict = "skipped" if r.get("ok") is None else "PASS (zero errors)" if r["ok"] else "FAIL"
        why = r.get("skipped") or r.get("error") or ("failed or missing requests" if r.get("ok") is False else "")
        say(f"{name:9s} {verdict}{': ' + why if why else ''}")
    say(f"details in {args.out}/summary.json")
    return 0 if all(r.get("ok") is not False for r in summary["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
