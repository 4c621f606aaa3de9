"""The engine's matrix kernels alone: one decode step's matrix products (every layer's fused qkv, o, gate/up and
down, then the LM head) on the default model's own GGUF blocks (native) or on its float32 panels, at a few batch
sizes, against the copy bandwidth measured in the same run.

    python -m bench.kernel_chain [--weights native|float32] [--rows 1,2,4,8,32] [--threads 2] [--iters 7]
    DISTSERVE_KERNEL_MARCH=haswell python -m bench.kernel_chain     # the kernels' AVX2 path

Per batch size: ms per pass over the layers and over the LM head (fastest of --iters), GB/s of weights read,
and that as a share of the copy bandwidth (read + write, bench/engine_bench_machine.py). One process drifts as
the shared machine's caches fill: compare two builds by alternating runs, not across runs.
"""
from __future__ import annotations

import argparse

import torch

from bench.engine_bench_machine import best_time, copy_bandwidth
from engine import kernels
from engine.linear import DenseLinear, QuantLinear
from engine.loader import load_checkpoint
from engine.model import LINEAR, LlamaModel


def matrices(model: LlamaModel, kind: type) -> tuple[list[DenseLinear | QuantLinear], DenseLinear | QuantLinear]:
    """(every layer's matrices in the order a step runs them, the LM head), each an op of `kind`."""
    ops = [layer[name] for layer in model.layers for name in LINEAR]
    if not all(isinstance(op, kind) for op in ops + [model.lm_head]):
        raise SystemExit(f"the model's matrices are not all {kind.__name__}")
    return ops, model.lm_head


def chain_ms(ops: list[DenseLinear | QuantLinear], rows: int, iters: int) -> float:
    xs = {k: torch.randn(rows, k) for k in {op.in_features for op in ops}}
    return best_time(lambda: [op(xs[op.in_features]) for op in ops], iters) * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", choices=["native", "float32"], default="native",
                   help="the GGUF's blocks, or float32 on the engine's panels")
    p.add_argument("--rows", default="1,2,4,8,32", help="batch sizes (rows of x), comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=7)
    args = p.parse_args(argv)
    if not kernels.load():
        raise SystemExit(f"the native kernels did not build: {kernels.load_error()}")
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint()
    native = args.weights == "native"
    if not native and not kernels.float32_panels():
        raise SystemExit("no float32 panel kernel in this build")
    model = LlamaModel(ckpt.config, ckpt.weights, torch.float32, quantized=ckpt.quantized, native=native)
    layers, head = matrices(model, QuantLinear if native else DenseLinear)
    copy = copy_bandwidth()
    layer_bytes = sum(q.nbytes for q in layers)
    products = "float32 panels" if not native else "int16" if kernels.int16_products() else "float32"
    print(f"kernels {kernels.isa()} ({products} products), {args.threads} threads; "
          f"copy bandwidth {copy / 1e9:.1f} GB/s; weights: layers {layer_bytes / 1e6:.1f} MB, "
          f"LM head {head.nbytes / 1e6:.1f} MB")
    for rows in (int(r) for r in args.rows.split(",")):
        ms_layers = chain_ms(layers, rows, args.iters)
        ms_head = chain_ms([head], rows, args.iters)
        gbps = (layer_bytes + head.nbytes) / (ms_layers + ms_head) / 1e6
        print(f"{rows:3d} rows: layers {ms_layers:7.2f} ms ({layer_bytes / ms_layers / 1e6:5.1f} GB/s), "
              f"LM head {ms_head:6.2f} ms ({head.nbytes / ms_head / 1e6:5.1f} GB/s); "
              f"{gbps:5.1f} GB/s = {gbps * 1e9 / copy:.0%} of the copy bandwidth")


if __name__ == "__main__":
    main()
