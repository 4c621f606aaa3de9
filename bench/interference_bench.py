"""Interference: the TPOT of a steady batch of decodes while long prompts keep arriving, colocated
(one instance on all cores; prefill-first and chunked) against disaggregated (prefill and decode
instances on their own cores), on the same cores, in one run.

    python -m bench.interference_bench [--decodes 8] [--decode-tokens 64] [--prompt-len 512] [--interval 2]
        [--layouts disagg] [--dtype float32] [--weights dense|native] [--compile]

The figure issue 10 asks for: the disagg decode instance's TPOT next to a busy prefill instance, as a
multiple of its TPOT alone (target <= 1.1x); run it at the engine's old defaults (float32, dense,
eager) and at its new ones to compare. `--steps` measures the same thing without the scheduler and
arrival times in the way: two instances in this process (prefill pinned to the first core, decode to
the second), the decode instance's step time alone and while the prefill instance runs 512-token
prefills back to back.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from bench.common import machine, today
from engine.args import default_disagg_devices
from engine.config import EngineConfig, SamplingParams, SchedulerConfig
from engine.loader import load_checkpoint
from serving.engine import AsyncEngine

TEXT = "Large language models serve chat, code and summaries; their latency has two parts. " * 400


def layouts(**precision) -> dict[str, EngineConfig]:
    """precision: dtype, weights, compile (EngineConfig fields), the same for every layout."""
    p, d = default_disagg_devices()
    sc = SchedulerConfig(max_num_seqs=64)
    return {
        "colocated": EngineConfig(mode="colocated", devices=["cpu"], scheduler=sc, **precision),
        "chunked": EngineConfig(mode="colocated", chunked_prefill=True, devices=["cpu"],
                                scheduler=SchedulerConfig(max_num_seqs=64, chunk_budget=256), **precision),
        "disagg": EngineConfig(mode="disagg", prefill_devices=p, decode_devices=d, scheduler=sc, **precision),
    }


async def scenario(engine: AsyncEngine, ids: list[int], args, with_prompts: bool) -> dict:
    steady = SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)

    async def run(stream):
        last = None
        async for out in stream:
            last = out
        return last

    decodes = [asyncio.create_task(run(engine.add_request(ids[i:i + 32], steady))) for i in range(args.decodes)]
    prompts = []
    if with_prompts:
        await asyncio.sleep(args.interval / 2)
        while not all(t.done() for t in decodes) and len(prompts) < args.max_prompts:
            long = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
            start = len(prompts) * 7
            prompts.append(asyncio.create_task(run(engine.add_request(ids[start:start + args.prompt_len], long))))
            await asyncio.sleep(args.interval)
    outs = await asyncio.gather(*decodes)
    long_outs = await asyncio.gather(*prompts)
    # steady decodes' gaps between tokens, after all of them started decoding
    gaps = [b - a for o in outs for a, b in zip(o.metrics.token_times[1:], o.metrics.token_times[2:])]
    return {"tpot_mean_ms": 1e3 * statistics.mean(gaps), "tpot_p90_ms": 1e3 * statistics.quantiles(gaps, n=10)[-1],
            "long_prompts": len(long_outs),
            "long_ttft_mean_ms": 1e3 * statistics.mean(o.metrics.ttft for o in long_outs) if long_outs else None}


async def measure(name: str, config: EngineConfig, ckpt, args) -> dict:
    engine = AsyncEngine(config, ckpt)
    await engine.start()
    ids = ckpt.tokenizer.encode(TEXT)
    try:
        await scenario(engine, ids, argparse.Namespace(**{**vars(args), "decodes": 2, "decode_tokens": 4}), False)
        quiet = await scenario(engine, ids, args, False)
        busy = await scenario(engine, ids, args, True)
    finally:
        await engine.shutdown()
    return {"layout": name, "quiet": quiet, "busy": busy}


def step_interference(ckpt, dtype: str, weights: str, compile: bool, batch: int = 8, steps: int = 40,
                      prompt_len: int = 512) -> dict:
    """Median decode step (ms) of a pinned decode instance alone and next to a prefill instance that
    runs prefills back to back; both threads of this process, as in disagg serving."""
    import threading

    import torch

    from engine.attention import AttentionMetadata
    from engine.compile import decode_inputs
    from engine.config import CacheConfig
    from engine.instance import Instance
    from engine.precision import build_model

    p, d = default_disagg_devices()
    model = build_model(ckpt, dtype, weights, compile=compile)
    pre = Instance("prefill", "prefill", p[0], model, CacheConfig(num_blocks=prompt_len // 16 + 4))
    dec = Instance("decode", "decode", d[0], model, CacheConfig(num_blocks=batch * 8 + 4))
    layers = lambda inst: [inst.pool.layer(i) for i in range(model.cfg.num_layers)]  # noqa: E731
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(batch)]
    ctx = [64] * batch
    ids = torch.randint(100, 1000, (batch,))

    def decode_step() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            if model.compiled is not None:
                table, sb, so = decode_inputs([1] * batch, ctx, tables, 16, torch.device("cpu"))
                _, k, v = model.compiled(ids, torch.tensor(ctx) - 1, table, torch.tensor(ctx), dec.pool.cache)
                dec.pool.cache[sb, :, 0, so] = k
                dec.pool.cache[sb, :, 1, so] = v
            else:
                meta = AttentionMetadata.build([1] * batch, ctx, tables, 16, torch.device("cpu"), model.dtype)
                model.forward(ids, torch.tensor(ctx) - 1, meta, layers(dec), torch.arange(batch))
        return time.perf_counter() - t0

    stop = threading.Event()
    prompt = torch.randint(100, 1000, (prompt_len,))

    def prefill_loop() -> int:
        meta = AttentionMetadata.build([prompt_len], [prompt_len], [list(range(prompt_len // 16 + 1))], 16,
                                       torch.device("cpu"), model.dtype)
        n = 0
        with torch.inference_mode():
            while not stop.is_set():
                model.forward(prompt, torch.arange(prompt_len), meta, layers(pre), torch.tensor([prompt_len - 1]))
                n += 1
        return n

    try:
        if dec.compiled is not None:
            dec.executor.submit(lambda: None).result()  # its warm-up (compile or cache load)
        for _ in range(5):
            dec.executor.submit(decode_step).result()
        alone = [dec.executor.submit(decode_step).result() for _ in range(steps)]
        loop = pre.executor.submit(prefill_loop)
        time.sleep(0.5)
        busy = [dec.executor.submit(decode_step).result() for _ in range(steps)]
        stop.set()
        prefills = loop.result()
    finally:
        pre.close()
        dec.close()
    a, b = statistics.median(alone) * 1e3, statistics.median(busy) * 1e3
    return {"alone_ms": a, "busy_ms": b, "slowdown": b / a, "prefills": prefills}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decodes", type=int, default=8, help="steady decoding requests")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between long prompts")
    ap.add_argument("--max-prompts", type=int, default=6, help="long prompts at most (bounds the run time)")
    ap.add_argument("--layouts", default="colocated,chunked,disagg", help="comma-separated subset")
    ap.add_argument("--dtype", default="float32", help="activations / KV dtype (default float32, the old default)")
    ap.add_argument("--weights", default="dense", choices=["auto", "dense", "native"])
    ap.add_argument("--compile", action="store_true", help="compiled decode steps")
    ap.add_argument("--steps", action="store_true", help="step-level measurement of the disagg pair (see above)")
    args = ap.parse_args(argv)
    ckpt = load_checkpoint()
    if args.steps:
        r = step_interference(ckpt, args.dtype, args.weights, args.compile, batch=args.decodes,
                              prompt_len=args.prompt_len)
        print(f"# Decode step next to a busy prefill instance, {today()}, {machine()}, {args.dtype}, {args.weights} "
              f"weights, {'compiled' if args.compile else 'eager'}; decode batch {args.decodes}, "
              f"{args.prompt_len}-token prefills back to back ({r['prefills']} ran)")
        print(f"decode step alone {r['alone_ms']:.1f} ms, next to prefill {r['busy_ms']:.1f} ms: "
              f"{r['slowdown']:.2f}x (target <= 1.1x)")
        return
    rows = []
    chosen = args.layouts.split(",")
    for name, cfg in layouts(dtype=args.dtype, weights=args.weights, compile=args.compile).items():
        if name not in chosen:
            continue
        rows.append(asyncio.run(measure(name, cfg, ckpt, args)))
        print(f"{name}: {rows[-1]}", flush=True)
    print(f"# Interference, {today()}, {machine()}, {args.dtype}, {args.weights} weights, "
          f"{'compiled' if args.compile else 'eager'}; {args.decodes} steady decodes x {args.decode_tokens} "
          f"tokens, a {args.prompt_len}-token prompt every {args.interval} s")
    print("| layout | TPOT quiet (ms) | TPOT with prompts (ms) | P90 with prompts (ms) | slowdown | "
          "long-prompt TTFT (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        q, b = r["quiet"], r["busy"]
        print(f"| {r['layout']} | {q['tpot_mean_ms']:.1f} | {b['tpot_mean_ms']:.1f} | {b['tpot_p90_ms']:.1f} | "
              f"{b['tpot_mean_ms'] / q['tpot_mean_ms']:.2f}x | {b['long_ttft_mean_ms']:.0f} |")
    by = {r["layout"]: r["busy"]["tpot_mean_ms"] for r in rows}
    if {"colocated", "chunked", "disagg"} <= by.keys():
        print(f"\nTPOT under prompt load, colocated / disagg = {by['colocated'] / by['disagg']:.2f}x; "
              f"chunked / disagg = {by['chunked'] / by['disagg']:.2f}x")


if __name__ == "__main__":
    main()
