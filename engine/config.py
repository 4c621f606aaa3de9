"""Validated configuration dataclasses: the model's shape, sampling, the KV cache, the layout."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    """Shape of a Llama-family model. Every architecture we run is one of these."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF-style, e.g. {"rope_type": "llama3", "factor": 8, ...}
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q, k, v projections
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.arch!r}; supported: {', '.join(ARCHITECTURES)}")
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        self.eos_token_ids = tuple(self.eos_token_ids)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers, at 2 bytes per element (bf16); scale for other dtypes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


@dataclass
class SamplingParams:
    """Per-request sampling, shaped like vLLM's SamplingParams."""

    max_tokens: int | None = 16  # None: up to the context window
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; 0: chosen token only; N: chosen + top-N
    include_stop_str_in_output: bool = False  # stop strings, and stop tokens' text, are kept in the output
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # with skip_special_tokens=False: "<|im_end|> next" (HF slow-tokenizer)
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings cannot end the output before this many tokens

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (self.min_tokens >= 0, "min_tokens", "must be non-negative"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             f"must be at most max_tokens ({self.max_tokens})"),
            (self.temperature >= 0.0, "temperature", "must be non-negative"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be -1, 0 (off) or positive"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (self.repetition_penalty > 0.0, "repetition_penalty", "must be positive"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise ValueError(f"{name} {msg}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'512MiB', '2G', '1.5GB', 1024 -> bytes (binary units either way)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 512MiB or 2GiB")
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(unit or " "))


@dataclass
class CacheConfig:
    """One instance's paged KV pool."""

    block_size: int = 16
    memory_bytes: int = 512 * 1024**2  # KV budget per instance
    num_blocks: int | None = None  # set: overrides the memory budget (tests use it)

    def __post_init__(self) -> None:
        self.memory_bytes = parse_size(self.memory_bytes)
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.memory_bytes <= 0:
            raise ValueError("kv cache memory must be positive")




@dataclass
class SchedulerConfig:
    """Batch limits shared by every policy."""

    max_num_seqs: int = 64  # running decodes per instance
    max_prefill_tokens: int = 4096  # prompt tokens per prefill batch
    max_prefill_seqs: int = 64  # prompts per prefill batch
    chunk_budget: int = 512  # tokens per step in chunked-prefill mode (decode + prompt chunks)
    max_waiting: int = 4096  # admission bound: requests not decoding yet (server answers 503 beyond)
    max_waiting_tokens: int | None = None  # ... and their prompt tokens (None: no token bound)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_prefill_tokens", "max_prefill_seqs", "chunk_budget", "max_waiting"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_waiting_tokens is not None and self.max_waiting_tokens <= 0:
            raise ValueError(f"max_waiting_tokens must be positive, got {self.max_waiting_tokens}")


@dataclass
class FaultConfig:
    """When an instance counts as broken. A step or KV pull that raises fails its requests and the instance
    goes on, until `max_faults` in a row take it out of dispatch; one that outlives its deadline (its thread
    cannot be stopped) takes it out at once. 0: no deadline."""

    step_timeout: float = 120.0  # seconds for one step (swap copies, forward, sampling)
    transfer_timeout: float = 30.0  # seconds for one KV pull
    max_faults: int = 3  # consecutive steps or pulls that raised

    def __post_init__(self) -> None:
        if self.step_timeout < 0 or self.transfer_timeout < 0:
            raise ValueError("step_timeout and transfer_timeout must be >= 0 (0: no deadline)")
        if self.max_faults <= 0:
            raise ValueError(f"max_faults must be positive, got {self.max_faults}")


Mode = Literal["colocated", "disagg"]
ClusterKind = Literal["local", "ray"]


@dataclass
class EngineConfig:
    """What to serve and how it is laid out.

    Devices: "cuda:N", or on a CPU a core set: "cpu" (all cores), "cpu:0", "cpu:0-1", "cpu:0,2"; with
    cluster "ray" each may name its node: "node1/cuda:0", "node0/cpu:1" (instances on one node share a
    placement group, and their KV hand-offs stay in shared memory).
    disagg: one entry of prefill_devices / decode_devices per instance; colocated: one instance
    per entry of `devices`.
    """

    model: str | None = None  # GGUF file or HF directory; None: the default model
    dtype: str = "auto"  # auto | bfloat16 | float32 | float16
    weights: str = "auto"  # auto | dense | native (the checkpoint's GGUF blocks; engine/precision.py)
    # disagg: the decode instances' own dtype / weights (None: as above; decode_weights native alone: dtype auto).
    # The KV hand-off converts the prefill pool's dtype to the decode pool's (bf16 prefill on AMX beside native
    # decode: each phase at its fastest)
    decode_dtype: str | None = None
    decode_weights: str | None = None
    compile: bool = False  # decode steps through torch.compile (engine/compile.py; minutes the first time)
    mode: Mode = "colocated"
    chunked_prefill: bool = False  # colocated only: Sarathi-style token budget per step
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    prefill_devices: list[str] = field(default_factory=list)
    decode_devices: list[str] = field(default_factory=list)
    transfer: str = "auto"  # auto | torch | cupy
    swap_space_bytes: int | str = "4GiB"  # host memory for preempted decodes
    cache: CacheConfig = field(default_factory=CacheConfig)
    decode_cache: CacheConfig | None = None  # disagg: decode pools of another size (None: same as cache)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    step_trace: int = 0  # keep the last N steps' shapes and iteration times (scheduler/runtime/trace.py); 0: off
    faults: FaultConfig = field(default_factory=FaultConfig)
    max_stream_lag: int = 1024  # tokens a stream's reader may fall behind before its request is aborted
    cluster: ClusterKind = "local"  # local: instances are threads of this process; ray: Ray actors, across nodes
    ray_address: str | None = None  # cluster ray: an existing Ray cluster ("auto", "HOST:PORT"); None: start one here
    ray_max_restarts: int = 0  # cluster ray: times Ray restarts a dead instance's actor (it then rejoins dispatch)

    def __post_init__(self) -> None:
        if self.cluster not in ("local", "ray"):
            raise ValueError(f"cluster must be 'local' or 'ray', got {self.cluster!r}")
        if self.ray_max_restarts < 0:
            raise ValueError(f"ray_max_restarts must be >= 0, got {self.ray_max_restarts}")
        if self.step_trace < 0:
            raise ValueError(f"step_trace must be >= 0, got {self.step_trace}")
        if self.max_stream_lag <= 0:
            raise ValueError(f"max_stream_lag must be positive, got {self.max_stream_lag}")
        if self.mode not in ("colocated", "disagg"):
            raise ValueError(f"mode must be 'colocated' or 'disagg', got {self.mode!r}")
        dd, dw = ("auto" if v is None else v for v in (self.decode_dtype, self.decode_weights))
        for name, value in (("dtype", self.dtype), ("decode_dtype", dd)):
            if value not in ("auto", "bfloat16", "float32", "float16"):
                raise ValueError(f"{name} must be auto, bfloat16, float32 or float16, got {value!r}")
        for name, value in (("weights", self.weights), ("decode_weights", dw)):
            if value not in ("auto", "dense", "native"):
                raise ValueError(f"{name} must be auto, dense or native, got {value!r}")
        if self.mode != "disagg" and (self.decode_dtype is not None or self.decode_weights is not None):
            raise ValueError("decode_dtype and decode_weights apply to mode disagg only")
        if self.transfer not in ("auto", "torch", "cupy"):
            raise ValueError(f"transfer must be auto, torch or cupy, got {self.transfer!r}")
        if self.mode == "disagg":
            if self.chunked_prefill:
                raise ValueError("chunked_prefill applies to colocated mode only")
            if not self.prefill_devices or not self.decode_devices:
                raise ValueError("disagg mode needs at least one prefill and one decode device")
        elif not self.devices:
            raise ValueError("colocated mode needs at least one device")
        for d in self.devices + self.prefill_devices + self.decode_devices:
            node, local = split_node(d)
            if node is not None and self.cluster != "ray":
                raise ValueError(f"device {d!r} names a node: layouts across nodes run with --cluster ray "
                                 "[--ray-address ADDR]")
            parse_device(local)
        self.swap_space_bytes = parse_size(self.swap_space_bytes)

    def precision(self, role: str) -> tuple[str, str]:
        """(dtype, weights) of an instance of this role (prefill | decode | colocated)."""
        if role == "decode":  # decode_weights native alone: the dtype native weights run in (float32)
            dtype = self.decode_dtype or ("auto" if self.decode_weights == "native" else self.dtype)
            return dtype, self.decode_weights or self.weights
        return self.dtype, self.weights


def split_node(spec: str) -> tuple[int | None, str]:
    """'node1/cuda:0' -> (1, 'cuda:0'); 'cpu:0' -> (None, 'cpu:0'). A plan across nodes names each instance's
    node (scheduler/planner/placement.py); the devices after the slash are that node's."""
    head, sep, rest = spec.partition("/")
    if not sep:
        return None, spec
    if not (head.startswith("node") and head[4:].isdigit()):
        raise ValueError(f"bad device {spec!r}: a node is named nodeK, e.g. node1/cuda:0 or node1/cpu:0-3")
    return int(head[4:]), rest


def parse_device(spec: str) -> tuple[str, list[int] | int | None]:
    """'cpu' -> ('cpu', None); 'cpu:0-1' -> ('cpu', [0, 1]); 'cuda:1' -> ('cuda', 1)."""
    kind, _, rest = spec.partition(":")
    if kind == "cuda":
        if rest and not rest.isdigit():
            raise ValueError(f"bad device {spec!r}: use cuda or cuda:N")
        return "cuda", int(rest) if rest else 0
    if kind != "cpu":
        raise ValueError(f"bad device {spec!r}: use cpu, cpu:CORES (e.g. cpu:0-1) or cuda:N")
    if not rest:
        return "cpu", None
    cores: list[int] = []
    try:
        for part in rest.split(","):
            lo, _, hi = part.partition("-")
            cores.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"bad core list in {spec!r}: use e.g. cpu:0, cpu:0-3 or cpu:0,2") from None
    if not cores:
        raise ValueError(f"empty core list in {spec!r}")
    return "cpu", sorted(set(cores))
