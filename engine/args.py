"""Every engine knob in one flat dataclass: the server's flags and LLM(...)'s keywords are derived from it.

    EngineArgs(mode="disagg", max_num_seqs=32).engine_config()     # -> the validated, nested EngineConfig
    EngineArgs.add_cli_args(parser, mode="disagg")                 # --mode, --max-num-seqs, ... (help from here)
    EngineArgs.from_cli(namespace)

A field's flag is its name with dashes; its help is the field's `help` metadata; list fields take
several values (--prefill-devices cpu:0 cpu:1); Literal fields list their choices; bool fields are
switches. Adding a knob is adding a field here (and reading it in engine_config()).
"""
from __future__ import annotations

import argparse
import os
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Literal

from engine.config import CacheConfig, EngineConfig, FaultConfig, SchedulerConfig


def _h(text: str, default=MISSING, factory=MISSING):
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def default_disagg_devices() -> tuple[list[str], list[str]]:
    """Half the cores prefill, half decode: 'cpu:0' / 'cpu:1' on a 2-core machine."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return ["cpu"], ["cpu"]
    half = len(cores) // 2
    fmt = lambda cs: "cpu:" + ",".join(map(str, cs))  # noqa: E731
    return [fmt(cores[:half])], [fmt(cores[half:])]


@dataclass
class EngineArgs:
    model: str | None = _h("GGUF file or HF directory (default: the bundled SmolLM2 model)", None)
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = _h(
        "activations and KV dtype (auto: float32 with native weights; else bfloat16 on CUDA and on CPUs with "
        "native bf16, float32 elsewhere)", "auto")
    weights: Literal["auto", "dense", "native"] = _h(
        "native: the GGUF's own Q4_0/Q4_1/Q8_0 blocks through the CPU kernels; dense: dequantized to --dtype "
        "(auto: native where the checkpoint has such blocks and the kernels build)", "auto")
    decode_dtype: Literal["auto", "bfloat16", "float32", "float16"] | None = _h(
        "disagg: the decode instances' dtype (default: --dtype; auto with --decode-weights native)", None)
    decode_weights: Literal["auto", "dense", "native"] | None = _h(
        "disagg: the decode instances' weights (default: --weights). With bf16 prefill on a CPU with AVX-512 "
        "BF16 / AMX, --decode-weights native decodes 1-8 sequences ~2-3x faster; the KV hand-off converts the "
        "prefill pool's dtype", None)
    compile: bool = _h("compiled decode steps (torch.compile; the first start on a machine compiles for minutes, "
                       "later starts load them from the disk cache)", False)
    mode: Literal["colocated", "disagg"] = _h("prefill/decode layout", "colocated")
    chunked_prefill: bool = _h("colocated only: Sarathi-style chunked prefill", False)
    devices: list[str] | None = _h("colocated: one instance per device (default: cpu = all cores)", None)
    prefill_devices: list[str] | None = _h("disagg: one prefill instance per device (default: half the cores)",
                                           None)
    decode_devices: list[str] | None = _h("disagg: one decode instance per device (default: the other half)", None)
    transfer: Literal["auto", "torch", "cupy"] = _h(
        "KV hand-off backend (auto: CuPy peer-to-peer between two GPUs, else torch copies)", "auto")
    kv_cache_memory: str = _h("KV cache budget per instance, e.g. 512MiB, 2GiB", "512MiB")
    num_kv_blocks: int | None = _h("KV blocks per instance (overrides --kv-cache-memory)", None)
    decode_kv_blocks: int | None = _h("disagg: KV blocks per decode instance (default: as the others)", None)
    block_size: int = _h("tokens per KV block", 16)
    swap_space: str = _h("host memory per decode instance for swapped-out KV; beyond it a preempted request "
                         "is recomputed", "4GiB")
    max_num_seqs: int = _h("running decodes per instance", 64)
    max_prefill_tokens: int = _h("prompt tokens per prefill batch (FCFS)", 4096)
    max_prefill_seqs: int = _h("prompts per prefill batch", 64)
    chunk_budget: int = _h("--chunked-prefill: tokens per step (decode tokens first, then prompt chunks)", 512)
    max_waiting: int = _h("admission bound: requests admitted and not decoding yet (queued for or in prefill, or "
                          "waiting for a decode slot); beyond it new requests get 503 with Retry-After at once", 4096)
    max_waiting_tokens: int | None = _h("admission bound in those requests' prompt tokens (default: none)", None)
    step_timeout: float = _h("seconds a step may run before its instance counts as hung: its requests fail and "
                             "it leaves dispatch (0: no deadline)", 120.0)
    transfer_timeout: float = _h("seconds a KV pull may run before its decode instance counts as hung "
                                 "(0: no deadline)", 30.0)
    max_instance_faults: int = _h("steps or KV pulls in a row that may raise on an instance (each fails its "
                                  "requests) before it is taken out of dispatch", 3)
    max_stream_lag: int = _h("tokens a stream's reader may fall behind before the request is aborted and its "
                             "KV freed", 1024)
    cluster: Literal["local", "ray"] = _h(
        "where instances run: local (threads of this process) or ray (one Ray actor each, across nodes; "
        "devices may name a node, node1/cpu:0)", "local")
    ray_address: str | None = _h("--cluster ray: address of a running Ray cluster (auto, HOST:PORT); default: "
                                 "start a one-node Ray here", None)
    ray_max_restarts: int = _h("--cluster ray: times Ray restarts an instance's actor that died (it rejoins "
                               "dispatch with an empty pool)", 0)
    step_trace: int = _h("record the last N engine steps (shape, iteration time) for GET /debug/steps (0: off)", 0)

    def engine_config(self) -> EngineConfig:
        """The validated EngineConfig (ValueError says what is wrong)."""
        if self.mode == "disagg":
            if self.chunked_prefill or self.devices:
                raise ValueError("chunked_prefill and devices apply to mode colocated only")
            pre, dec = default_disagg_devices()
            layout = dict(prefill_devices=self.prefill_devices or pre, decode_devices=self.decode_devices or dec)
        else:
            if self.prefill_devices or self.decode_devices:
                raise ValueError("prefill_devices and decode_devices apply to mode disagg only")
            layout = dict(devices=self.devices or ["cpu"], chunked_prefill=self.chunked_prefill)
        cache = CacheConfig(block_size=self.block_size, memory_bytes=self.kv_cache_memory,
                            num_blocks=self.num_kv_blocks)
        decode_cache = (CacheConfig(block_size=self.block_size, memory_bytes=self.kv_cache_memory,
                                    num_blocks=self.decode_kv_blocks) if self.decode_kv_blocks else None)
        sched = SchedulerConfig(max_num_seqs=self.max_num_seqs, max_prefill_tokens=self.max_prefill_tokens,
                                max_prefill_seqs=self.max_prefill_seqs, chunk_budget=self.chunk_budget,
                                max_waiting=self.max_waiting, max_waiting_tokens=self.max_waiting_tokens)
        faults = FaultConfig(self.step_timeout, self.transfer_timeout, self.max_instance_faults)
        return EngineConfig(model=self.model, dtype=self.dtype, weights=self.weights, compile=self.compile,
                            decode_dtype=self.decode_dtype, decode_weights=self.decode_weights,
                            mode=self.mode, transfer=self.transfer,
                            swap_space_bytes=self.swap_space, cache=cache, decode_cache=decode_cache,
                            scheduler=sched, step_trace=self.step_trace, faults=faults,
                            max_stream_lag=self.max_stream_lag, cluster=self.cluster,
                            ray_address=self.ray_address, ray_max_restarts=self.ray_max_restarts, **layout)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, **defaults: object) -> None:
        """One flag per field; `defaults` overrides field defaults (the server defaults to mode=disagg)."""
        hints = typing.get_type_hints(cls)
        group = parser.add_argument_group("engine")
        for f in fields(cls):
            default = defaults.get(f.name, f.default)
            kw: dict = {"default": default, "help": f.metadata["help"]}
            tp = hints[f.name]
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            base = args[0] if args else tp
            if tp is bool:
                kw = {"action": argparse.BooleanOptionalAction, **kw}
            elif typing.get_origin(base) is list:
                kw["nargs"] = "+"
            elif typing.get_origin(tp) is Literal:
                kw["choices"] = typing.get_args(tp)
            elif typing.get_origin(base) is Literal:  # an optional one: None (unset) is its default
                kw["choices"] = typing.get_args(base)
            elif base in (int, float):
                kw["type"] = base
            if default not in (None, False) and "action" not in kw:
                kw["help"] += f" (default: {default})"
            group.add_argument("--" + f.name.replace("_", "-"), **kw)

    @classmethod
    def from_cli(cls, ns: argparse.Namespace) -> EngineArgs:
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})
