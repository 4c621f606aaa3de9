"""A Hugging Face model directory: config.json (and generation_config.json) -> ModelConfig, *.safetensors
(sharded or not) -> float32 weights under HF Llama names; and the JSON reader the tokenizer shares.
engine/loader.py calls it and checks the result; torch is imported only to read weights."""
from __future__ import annotations

import glob
import json
import os
from typing import TYPE_CHECKING

from engine.config import ModelConfig

if TYPE_CHECKING:
    import torch

HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def hf_config(path: str) -> ModelConfig:
    cfg = read_json(os.path.join(path, "config.json"))
    # "architectures" names the model class; configs written without a model have only model_type.
    name = (cfg.get("architectures") or [cfg.get("model_type")])[0]
    arch = HF_ARCHITECTURES.get(name, name if name in HF_ARCHITECTURES.values() else None)
    if arch is None:
        raise ValueError(f"unsupported architecture {name!r}; supported: {sorted(HF_ARCHITECTURES)}")
    gen = read_json(os.path.join(path, "generation_config.json"), missing_ok=True)
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    heads = cfg["num_attention_heads"]
    # transformers 5 writes rope_parameters (theta included); older configs rope_theta + rope_scaling.
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    theta = float(cfg.get("rope_theta") or rope.pop("rope_theta", 10000.0))
    rope.pop("rope_theta", None)
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = None
    return ModelConfig(
        arch=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope_theta=theta,
        rope_scaling=rope,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        bos_token_id=gen.get("bos_token_id", cfg.get("bos_token_id")),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
    )


def hf_weights(path: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    import torch
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):  # sharded: the index names each tensor's file
        files = sorted(set(read_json(index)["weight_map"].values()))
    else:
        files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights in {path}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(os.path.join(path, file), framework="pt") as f:
            for k in f.keys():
                # Old checkpoints saved RoPE's inv_freq buffer; tied models may repeat the embedding.
                if k.endswith("rotary_emb.inv_freq") or (k == "lm_head.weight" and config.tie_word_embeddings):
                    continue
                weights[k] = f.get_tensor(k).to(torch.float32)
    return weights


def read_json(path: str, missing_ok: bool = False) -> dict:
    """A JSON file of a model directory; {} for a missing file when missing_ok."""
    if missing_ok and not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
