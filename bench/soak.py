"""`make soak`: the real server (disagg, loopback) under sustained load near capacity, then the proof that
nothing was lost, stuck or left behind.

    python -m bench.soak [--requests 2000] [--duration 600] [--out out/soak] [--replays N]

1. start server.py (disagg, float32: a seeded request's text must not depend on the batch it ran in)
2. warm up with --warmup calls of the mix; once idle, note the server's RSS and asyncio task count
3. send --requests calls of the mix over --duration seconds (Poisson arrivals; bench/client.py's run_calls):
   completions and chat, streamed and not, n = 1 or 2, stop strings, greedy / seeded / unseeded sampling;
   ~10% of all clients hang up mid-stream, ~5% never read their stream (hold it, then close it)
4. once idle, check: no unexpected error (every client that did not hang up on purpose got its whole
   answer), every greedy or seeded answer equal to the same call sent alone afterwards, KV blocks 0 and
   no request in any queue on every instance, /metrics started = finished + aborted + failed, asyncio tasks
   back to the warm count, RSS growth after warm-up <= --max-rss-growth
5. write OUT/soak.json; print the checks; exit 1 if one failed

Bounded: every call has a timeout and the whole run --max-seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.client import Call, ClientConfig, Reply, run_calls, send
from bench.common import machine, today
from bench.server_process import ServerProcess
from scheduler.planner.workload import ArrivalSpec, send_times

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = [
    "The river flows through the old town and under seven stone bridges.",
    "Explain in one sentence why the sky looks blue during the day.",
    "Disaggregated serving runs the prefill and the decode phase on different devices.",
    "Write a short note to a friend about the weather this weekend.",
    "A good cup of tea needs fresh water, the right temperature and patience.",
    "List three things that make a programming language easy to learn.",
    "The library opens at nine and closes at six, except on Sundays.",
    "Summarize the plot of a story about a lost dog that finds its way home.",
    "Bread rises because yeast turns sugar into gas and alcohol.",
    "What are the main differences between a lake and a sea?",
    "The committee will meet again next month to discuss the budget.",
    "Describe the sound of rain on a tin roof.",
]
STOPS = [".", "\n"]


# ---------------- the workload ----------------
@dataclass
class Item:
    """One call of the mix and what is expected of it."""

    call: Call
    kind: str  # normal | hang-up | never-read
    deterministic: bool  # greedy or seeded: its answer must equal the same call sent alone


def mix(n: int, seed: int, max_tokens: tuple[int, int] = (4, 16)) -> list[Item]:
    """Short prompts and outputs, so that thousands of calls fit in minutes on two cores."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        text = " ".join(rng.sample(SENTENCES, rng.randint(1, 2)))
        chat = rng.random() < 0.5
        body: dict = ({"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}) | {
            "max_tokens": rng.randint(*max_tokens), "stream": rng.random() < 0.6}
        u = rng.random()  # sampling: 5% greedy, 10% seeded, the rest unseeded
        body |= {"temperature": 0.0} if u < 0.05 else {"temperature": 0.8, "top_p": 0.95}
        if 0.05 <= u < 0.15:
            body["seed"] = rng.randrange(1 << 30)
        if rng.random() < 0.15:
            body["n"] = 2
        if rng.random() < 0.2:
            body["stop"] = rng.sample(STOPS, 1)
        kind = "normal"
        if body["stream"]:  # of all calls: ~10% hang up mid-stream, ~5% never read
            v = rng.random()
            kind = "hang-up" if v < 0.10 / 0.6 else "never-read" if v < 0.15 / 0.6 else "normal"
        call = Call("/v1/chat/completions" if chat else "/v1/completions", body)
        if kind == "hang-up":
            call.hang_up_after = rng.randint(1, 4)
        elif kind == "never-read":
            call.hang_up_after, call.stall = 0, rng.uniform(1.0, 8.0)
            body["max_tokens"] = 32
        deterministic = kind == "normal" and (body["temperature"] == 0.0 or "seed" in body)
        items.append(Item(call, kind, deterministic))
    return items


def expected(item: Item, r: Reply) -> bool:
    """Whether the client saw what it should: the whole answer, or (hanging up) no error before it left."""
    if item.kind == "never-read":
        return r.hung_up and r.status == 200
    if item.kind == "hang-up" and r.hung_up:
        return r.status == 200 and not r.error
    n = item.call.body.get("n", 1)
    return r.ok and sorted(r.finish) == list(range(n)) and all(f in ("stop", "length") for f in r.finish.values())


# ---------------- the server ----------------
@asynccontextmanager
async def server(flags: list[str], log: Path) -> AsyncIterator[tuple[str, int]]:
    """The real server (bench/server_process.py); yields (url, pid). Its exit after SIGTERM must be clean."""
    srv = ServerProcess(flags, log)
    async with srv:
        yield srv.url, srv.proc.pid
    if srv.proc.returncode != 0:
        raise RuntimeError(f"server exited with {srv.proc.returncode} after SIGTERM; see {log}")


async def scrape(url: str) -> dict[str, float]:
    """Every sample of GET /metrics, keyed by name{labels} as Prometheus prints it."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(smp.labels.items()))
            out[f"{smp.name}{{{labels}}}" if labels else smp.name] = smp.value
    return out


def total(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def settle(url: str, timeout: float = 60.0) -> dict[str, float]:
    """Waits until no request is in any queue, no KV block is used and the task count holds still."""
    deadline = time.monotonic() + timeout
    last = -1.0
    while True:
        m = await scrape(url)
        busy = sum(total(m, f"distserve_{g}") for g in ("kv_blocks_used", "waiting_requests", "prefilling_requests",
                                                         "migrating_requests", "running_requests", "swapped_requests"))
        tasks = m["distserve_asyncio_tasks"]
        if (not busy and tasks == last) or time.monotonic() > deadline:
            return m
        last = tasks
        await asyncio.sleep(1.0)


# ---------------- the run ----------------
@dataclass
class Sampler:
    """RSS and load every `every` seconds while the soak runs (bounded by its duration)."""

    url: str
    pid: int
    every: float = 10.0
    rows: list[dict] = field(default_factory=list)

    async def run(self, t0: float, replies: list[Reply], n: int) -> None:
        while True:
            await asyncio.sleep(self.every)
            m = await scrape(self.url)
            row = {"t": round(time.monotonic() - t0), "rss_mib": round(rss_mib(self.pid), 1), "done": len(replies),
                   "running": total(m, "distserve_running_requests"), "waiting": total(m, "distserve_waiting_requests"),
                   "tasks": m["distserve_asyncio_tasks"]}
            self.rows.append(row)
            print(f"  t={row['t']:4d}s  {row['done']}/{n} done, {row['running']:.0f} running, {row['waiting']:.0f} "
                  f"waiting, RSS {row['rss_mib']:.0f} MiB, {row['tasks']:.0f} tasks", flush=True)


async def capacity(url: str, args: argparse.Namespace) -> float:
    """Calls of the mix per second that --concurrency clients in a closed loop get through."""
    calls = [i.call for i in mix(args.calibrate, args.seed + 2)]
    t = time.monotonic()
    await run_calls(calls, [0.0] * len(calls), ClientConfig(url, request_timeout=args.request_timeout,
                                                             progress=False, max_concurrency=args.concurrency))
    return len(calls) / (time.monotonic() - t)


async def replay(cfg: ClientConfig, items: list[Item], replies: list[Reply], limit: int) -> tuple[int, list[dict]]:
    """Sends each deterministic call that was answered in full again, alone; returns (count, mismatches)."""
    checked = [(i, r) for i, r in zip(items, replies) if i.deterministic and expected(i, r)][:limit]
    mismatches = []
    async with aiohttp.ClientSession() as session:
        for item, r in checked:
            alone = await send(session, cfg, item.call, time.perf_counter())
            if alone.texts != r.texts:
                mismatches.append({"body": item.call.body, "load": r.texts, "alone": alone.texts})
    return len(checked), mismatches


async def soak(args: argparse.Namespace) -> dict:
    flags = ["--mode", "disagg", "--dtype", "float32", "--log-level", "WARNING", *args.server_args]
    rate = args.requests / args.duration
    async with server(flags, Path(args.out) / "server.log") as (url, pid):
        cfg = ClientConfig(url, request_timeout=args.request_timeout, progress=False)
        cap = await capacity(url, args)
        print(f"capacity ~ {cap:.2f} calls/s ({args.concurrency} clients in a closed loop); the soak offers "
              f"{rate:.2f}/s = {rate / cap:.0%}", flush=True)
        warm = mix(args.warmup, args.seed + 1)
        await run_calls([i.call for i in warm], send_times(ArrivalSpec("poisson"), rate, len(warm), args.seed + 1),
                        cfg)
        m0 = await settle(url)
        rss0, tasks0 = rss_mib(pid), m0["distserve_asyncio_tasks"]
        print(f"warm: RSS {rss0:.0f} MiB, {tasks0:.0f} asyncio tasks; {args.requests} calls over {args.duration:g} s",
              flush=True)

        items = mix(args.requests, args.seed)
        replies: list[Reply] = []
        sampler = Sampler(url, pid)
        t0 = time.monotonic()
        watch = asyncio.create_task(sampler.run(t0, replies, len(items)))
        try:
            replies = await run_calls([i.call for i in items], send_times(ArrivalSpec("poisson"), rate, len(items),
                                                                          args.seed), cfg, sink=replies)
        finally:
            watch.cancel()
        load_s = time.monotonic() - t0
        m1 = await settle(url)
        rss1 = rss_mib(pid)
        print(f"load done in {load_s:.0f} s; replaying the deterministic calls one at a time", flush=True)
        replayed, mismatches = await replay(cfg, items, replies, args.replays)
        m2 = await settle(url)

    doc = {"date": today(), "machine": machine(), "command": " ".join(sys.argv), "server_flags": flags,
           "requests": len(items), "duration_s": args.duration, "load_s": round(load_s, 1), "rate": rate,
           "capacity": round(cap, 2), "load": round(rate / cap, 2), **describe(items, replies),
           "replayed": replayed, "mismatches": mismatches[:10], "samples": sampler.rows}
    rss = {"warm": round(rss0, 1), "after_load": round(rss1, 1), "growth": round((rss1 - rss0) / rss0, 4),
           "max": max([rss0, rss1] + [r["rss_mib"] for r in sampler.rows])}
    return doc | verdict(items, replies, replayed > 0 and not mismatches, m1, m2, tasks0, rss, args.max_rss_growth)


def describe(items: list[Item], replies: list[Reply]) -> dict:
    body = [i.call.body for i in items]
    return {"kinds": {k: sum(i.kind == k for i in items) for k in ("normal", "hang-up", "never-read")},
            "streams": sum(bool(b["stream"]) for b in body), "chat": sum("messages" in b for b in body),
            "n2": sum(b.get("n", 1) == 2 for b in body), "stop": sum("stop" in b for b in body),
            "seeded": sum("seed" in b for b in body), "greedy": sum(b["temperature"] == 0.0 for b in body),
            "hung_up": sum(r.hung_up for r in replies), "http_503": sum(r.status == 503 for r in replies)}


def verdict(items: list[Item], replies: list[Reply], texts_equal: bool, after_load: dict[str, float],
            end: dict[str, float], tasks0: float, rss: dict, max_growth: float) -> dict:
    """The checks, from what the clients saw and the server's /metrics once idle (after the load; at the end)."""
    unexpected = [{"kind": i.kind, "body": i.call.body, "status": r.status, "error": r.error, "finish": r.finish}
                  for i, r in zip(items, replies) if not expected(i, r)]
    started = total(end, "distserve_request_started_total")
    ended = {k.split('"')[1]: v for k, v in end.items() if k.startswith("distserve_request_finish_total{")}
    blocks = {k: v for k, v in end.items() if k.startswith("distserve_kv_blocks_used")}
    queued = sum(total(end, f"distserve_{g}_requests") for g in ("waiting", "prefilling", "migrating", "running",
                                                                  "swapped"))
    tasks = [after_load["distserve_asyncio_tasks"], end["distserve_asyncio_tasks"]]
    checks = {
        "no unexpected errors": not unexpected,
        "deterministic texts equal alone": texts_equal,
        "KV blocks 0 on every instance": bool(blocks) and not any(blocks.values()),
        "no request in any queue": queued == 0,
        "started = finished + aborted + failed": started == sum(ended.values()) > 0,
        "no leftover asyncio tasks": max(tasks) <= tasks0,
        f"RSS growth after warm-up <= {max_growth:.0%}": rss["growth"] <= max_growth,
    }
    metrics = {"started": started, "finished": ended, "blocks_used": blocks, "queued": queued,
               "asyncio_tasks": {"warm": tasks0, "after_load": tasks[0], "end": tasks[1]}}
    return {"num_unexpected": len(unexpected), "unexpected": unexpected[:20], "metrics": metrics, "rss_mib": rss,
            "checks": checks}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--duration", type=float, default=600.0, help="seconds over which the requests are sent")
    p.add_argument("--warmup", type=int, default=100, help="calls before the RSS and task baselines")
    p.add_argument("--calibrate", type=int, default=150, help="calls of the closed-loop capacity measurement")
    p.add_argument("--concurrency", type=int, default=48, help="closed-loop clients measuring the capacity")
    p.add_argument("--replays", type=int, default=10_000, help="at most this many deterministic calls replayed")
    p.add_argument("--max-rss-growth", type=float, default=0.05)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--max-seconds", type=float, default=3600.0, help="bound on the whole run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/soak")
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                   help="the rest of the line goes to server.py (e.g. --max-num-seqs 32)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    async def bounded() -> dict:
        async with asyncio.timeout(args.max_seconds):
            return await soak(args)

    doc = asyncio.run(bounded())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(doc, indent=1, default=lambda o: asdict(o)))
    print(f"\n{doc['requests']} calls over {doc['load_s']:.0f} s ({doc['kinds']}); {doc['replayed']} replayed alone; "
          f"RSS {doc['rss_mib']}; metrics {doc['metrics']}")
    for name, ok in doc["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    for u in doc["unexpected"][:5]:
        print("  unexpected:", u)
    for mm in doc["mismatches"][:3]:
        print("  mismatch:", mm)
    print(f"written {out / 'soak.json'}")
    return 0 if all(doc["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
