"""The checkpoint's recommended sampling, for request fields a client leaves out (vLLM's `--generation-config auto`).

Where it comes from, first found wins:
  a HF directory's generation_config.json   temperature, top_p, top_k, min_p, repetition_penalty
  a GGUF's general.sampling.* keys           temp, top_p, top_k, min_p, penalty_repeat (llama.cpp's names)
  the bundled default model                  SmolLM2's model card: temperature 0.2, top_p 0.9 (its GGUF
                                             carries no sampling keys; at OpenAI's 1.0 this small 4-bit
                                             model rambles)
Otherwise nothing: OpenAI's defaults (temperature 1, top_p 1) apply.
"""
from __future__ import annotations

import json
import os

GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
             "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
             "general.sampling.penalty_repeat": "repetition_penalty"}
HF_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
BUNDLED_MODEL = {"temperature": 0.2, "top_p": 0.9}  # HuggingFaceTB/SmolLM2-135M-Instruct's model card


def checkpoint_sampling(path: str | None) -> tuple[dict[str, float], str]:
    """(defaults, where they came from) for a checkpoint path (None: the bundled default model)."""
    from engine.loader import default_model_path

    if path is None or _same_file(path, default_model_path):
        return dict(BUNDLED_MODEL), "the bundled model's card"
    if os.path.isdir(path):
        gen = os.path.join(path, "generation_config.json")
        if os.path.exists(gen):
            with open(gen, encoding="utf-8") as f:
                cfg = json.load(f)
            found = {k: cfg[k] for k in HF_KEYS if isinstance(cfg.get(k), int | float)}
            if found:
                return found, "generation_config.json"
        return {}, "none in the checkpoint"
    import gguf

    fields = gguf.GGUFReader(path).fields
    found = {name: fields[key].contents() for key, name in GGUF_KEYS.items() if key in fields}
    return ({k: v for k, v in found.items() if isinstance(v, int | float)},
            "the GGUF's general.sampling keys" if found else "none in the checkpoint")


def _same_file(path: str, default_path) -> bool:
    try:
        return os.path.samefile(path, default_path())
    except (OSError, FileNotFoundError):
        return False
