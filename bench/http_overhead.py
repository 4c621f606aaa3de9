"""Streaming overhead of the HTTP front door: tokens/s of N concurrent streams through HTTP/SSE against the
same load through the in-process API, in the same run, on the same engine.

    .venv/bin/python -m bench.http_overhead [--concurrency 32] [--max-tokens 64] [--rounds 3] [--mode disagg]

The server (create_app) runs on this process's event loop, next to the engine, as `server.py` runs it; the
HTTP client is a plain aiohttp reader that parses every chunk (what any SSE client does). With --client-process
the client runs in a child process instead, so its parsing does not share the server's loop (on a 2-core box
it still shares the cores). Rounds alternate API / HTTP so drift (thermal, neighbours) hits both alike. Every
request is greedy with ignore_eos, so both sides generate exactly N * max_tokens tokens.
Aim: HTTP tokens/s >= 0.9 x API tokens/s.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

import orjson
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

from engine.args import default_disagg_devices
from engine.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from server import ServerConfig, create_app
from serving.engine import AsyncEngine

WORDS = "the quick brown fox jumps over the lazy dog while a small cat watches from the old stone wall".split()


def prompts(n: int, length: int) -> list[str]:
    """Distinct prompts of about `length` words, so no two requests are identical."""
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(length)) + f" #{i}" for i in range(n)]


async def run_api(engine: AsyncEngine, ps: list[str], max_tokens: int) -> tuple[int, float]:
    async def one(p: str) -> int:
        n = 0
        async for out in engine.add_request(p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)):
            n += len(out.new_token_ids)
        return n

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in ps))
    return sum(counts), time.perf_counter() - t0


async def run_http(url: str, ps: list[str], max_tokens: int, session: ClientSession | None = None) -> tuple[int, float]:
    """N concurrent SSE streams. Pass a session whose pool already holds N keep-alive connections (as a load
    generator would), else TCP set-up staggers the arrivals and splits the first prefill batch."""
    async def one(s: ClientSession, p: str) -> int:
        body = {"prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        n, usage = 0, None
        async with s.post(url + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            async for line in r.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = orjson.loads(line[6:])
                if chunk["choices"]:
                    n += 1
                elif chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
        assert usage == max_tokens and n > 0, (usage, n)  # a held-back token (partial UTF-8) sends no chunk
        return usage

    own = session is None
    s = session or ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=3600))
    try:
        if own:  # open the N keep-alive connections, untimed
            await asyncio.gather(*(one(s, p) for p in ps))
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(s, p) for p in ps))
        return sum(counts), time.perf_counter() - t0
    finally:
        if own:
            await s.close()


def run_http_in_child(url: str, ps: list[str], max_tokens: int) -> asyncio.Future:
    """The HTTP client in a child process; returns (tokens, seconds) from its stdout."""
    code = ("import asyncio, json, sys; from bench.http_overhead import run_http; "
            "a = json.loads(sys.stdin.read()); print(json.dumps(asyncio.run(run_http(*a))))")

    def child() -> tuple[int, float]:
        out = subprocess.run([sys.executable, "-c", code], input=json.dumps([url, ps, max_tokens]), text=True,
                             capture_output=True, check=True).stdout
        return tuple(json.loads(out.strip().splitlines()[-1]))

    return asyncio.get_running_loop().run_in_executor(None, child)


async def bench(args: argparse.Namespace) -> None:
    if args.mode == "disagg":
        pre, dec = default_disagg_devices()
        layout = dict(mode="disagg", prefill_devices=pre, decode_devices=dec)
    else:
        layout = dict(mode="colocated", devices=["cpu"])
    engine = AsyncEngine(EngineConfig(model=args.model, dtype=args.dtype, **layout,
                                      cache=CacheConfig(memory_bytes=args.kv_cache_memory),
                                      scheduler=SchedulerConfig(max_num_seqs=max(args.concurrency, 1))))
    app = create_app(engine, ServerConfig(port=0))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()  # starts the engine
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    ps = prompts(args.concurrency, args.prompt_words)
    arrivals: list[float] = []  # when each request reached the engine: HTTP spreads them, which splits batches
    submit = engine.add_request
    engine.add_request = lambda *a, **kw: (arrivals.append(time.perf_counter()), submit(*a, **kw))[1]
    session = ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=3600))
    http = (lambda: run_http_in_child(url, ps, args.max_tokens)) if args.client_process else (
        lambda: run_http(url, ps, args.max_tokens, session))
    api, web_, ratios = [], [], []
    try:
        await run_api(engine, ps, 2)  # warm-up: first-call allocations, thread start-up
        await run_http(url, ps, 2, session)  # and N keep-alive connections, as a load generator keeps them
        for r in range(args.rounds):
            for name, fn, acc in (("api", lambda: run_api(engine, ps, args.max_tokens), api), ("http", http, web_)):
                arrivals.clear()
                tokens, secs = await fn()
                acc.append(tokens / secs)
                spread = 1e3 * (max(arrivals) - min(arrivals))
                print(f"round {r}: {name:4s} {tokens} tokens in {secs:6.2f}s = {tokens / secs:8.1f} tok/s "
                      f"(arrivals spread over {spread:5.1f} ms)", flush=True)
            ratios.append(web_[-1] / api[-1])
    finally:
        await session.close()
        await runner.cleanup()
    a, h, q = statistics.median(api), statistics.median(web_), statistics.median(ratios)
    print(f"\nconcurrency {args.concurrency}, max_tokens {args.max_tokens}, mode {args.mode}, dtype {engine.dtype}, "
          f"client {'child process' if args.client_process else 'in-process'}")
    print(f"in-process API: {a:8.1f} tok/s (median of {args.rounds})")
    print(f"HTTP/SSE:       {h:8.1f} tok/s (median of {args.rounds})")
    print(f"ratio HTTP/API: {q:.3f} (median of per-round ratios {', '.join(f'{x:.3f}' for x in ratios)}; "
          f"overhead {100 * (1 - q):+.1f}%, aim <= 10%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=32, help="concurrent streams (N)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per stream (ignore_eos: exactly this many)")
    p.add_argument("--prompt-words", type=int, default=16, help="words per prompt")
    p.add_argument("--rounds", type=int, default=3, help="alternating API/HTTP rounds; the median is reported")
    p.add_argument("--mode", choices=("disagg", "colocated"), default="disagg")
    p.add_argument("--model", default=None, help="default: the bundled model")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-memory", default="512MiB")
    p.add_argument("--client-process", action="store_true", help="run the HTTP client in a child process")
    args = p.parse_args()
    import uvloop

    uvloop.run(bench(args))


if __name__ == "__main__":
    main()
