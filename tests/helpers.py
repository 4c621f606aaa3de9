"""Tiny random-weight models for unit tests, and the Hugging Face reference built from the same weights."""
from __future__ import annotations

import torch

from engine.config import ModelConfig


def tiny_config(arch: str = "llama", **kw) -> ModelConfig:
    base = dict(arch=arch, vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                attention_bias=arch == "qwen2", max_position_embeddings=512, bos_token_id=1, eos_token_ids=(2,))
    base.update(kw)
    return ModelConfig(**base)


def hf_model(cfg: ModelConfig, seed: int = 0):
    """A transformers model of the same shape with random weights (float32, eval mode)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                  tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings,
                  rope_scaling=cfg.rope_scaling, head_dim=cfg.head_dim)
    if cfg.arch == "qwen2":
        hf_cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(hf_cfg)
    else:
        hf_cfg = transformers.LlamaConfig(**common, attention_bias=cfg.attention_bias)
        model = transformers.LlamaForCausalLM(hf_cfg)
    with torch.no_grad():  # HF initializes small; widen so that layers matter
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    return model.eval()


def hf_from_checkpoint(cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """transformers' LlamaForCausalLM holding exactly our dense weights: the outside reference."""
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings,
        rope_scaling=cfg.rope_scaling, attention_bias=cfg.attention_bias, bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_ids), attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype).eval()


class TinyTokenizer:
    """A stand-in tokenizer for tiny random models: one "x" of text per token; any text encodes as [3, 4, 5]."""

    def decode(self, ids, skip_special_tokens=True, spaces_between_special_tokens=True):
        return "x" * len(ids)

    def decode_incremental(self, ids, prefix_offset, read_offset, skip_special_tokens=True,
                           spaces_between_special_tokens=True):
        return "x" * (len(ids) - read_offset), prefix_offset, len(ids)

    def encode(self, text, add_special_tokens=False):
        return [3, 4, 5]

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        return " ".join(m["content"] for m in messages)

    def encode_chat(self, messages, add_generation_prompt=True, **kwargs):
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))
