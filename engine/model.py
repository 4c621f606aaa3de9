"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) as one plain-torch forward over a packed batch.

Weights arrive keyed by Hugging Face names; WEIGHT_MAP fuses them (qkv, gate_up) and loading fails
on a missing or left-over tensor. The model holds no per-request state: the KV cache and the batch
layout come in as arguments, so instances sharing one CPU share one copy of the weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine import kernels
from engine.attention import AttentionMetadata, TorchAttention, paged_decode_attention
from engine.config import ModelConfig
from engine.linear import DenseLinear, QuantLinear, stack_layers
from engine.quant import QuantTensor

_TORCH = TorchAttention()

# fused parameter -> the checkpoint tensors concatenated (dim 0) to form it, per layer
LAYER_MAP = {
    "qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "qkv_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "o": ("self_attn.o_proj.weight",),
    "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "down": ("mlp.down_proj.weight",),
    "attn_norm": ("input_layernorm.weight",),
    "mlp_norm": ("post_attention_layernorm.weight",),
}
LINEAR = ("qkv", "o", "gate_up", "down")  # the fused matrices; qkv_bias rides on qkv


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[head_dim/2] inverse frequencies, with llama3 / linear scaling as Hugging Face computes them."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        inv = inv / rs["factor"]
    elif kind == "llama3":
        factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old = rs.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(is_mid, mid, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv


class LlamaModel:
    """weights: dense tensors under HF names (any float dtype; cast to `dtype`). quantized: the
    checkpoint's GGUF blocks under the same names (Checkpoint.quantized); with native=True every
    matrix found there runs from its blocks (engine/linear.py QuantLinear) and the rest stays dense."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", quantized: dict[str, QuantTensor] | None = None,
                 native: bool = False) -> None:
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        left = dict(weights)
        quant = dict(quantized or {}) if native else {}
        if quant and self.device.type != "cpu":
            raise ValueError("native quantized weights run on CPU only")
        self.native = bool(quant)

        def take(name: str) -> torch.Tensor:
            if name not in left:
                raise ValueError(f"missing weight {name!r}")
            return left.pop(name).to(device=self.device, dtype=dtype)

        def linear(names: tuple[str, ...], bias: torch.Tensor | None = None) -> DenseLinear | QuantLinear:
            if all(n in quant for n in names) and len({quant[n].kind for n in names}) == 1:
                for n in names:
                    left.pop(n, None)  # the dense copy of a native matrix is not used
                q = QuantTensor.cat([quant[n] for n in names]) if len(names) > 1 else quant[names[0]]
                return QuantLinear(q, bias, dtype)
            parts = [take(n) for n in names]
            return DenseLinear(parts[0] if len(parts) == 1 else torch.cat(parts).contiguous(), bias)

        self.layers: list[dict[str, DenseLinear | QuantLinear]] = []
        norms = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            bias = (torch.cat([take(p + n) for n in LAYER_MAP["qkv_bias"]]) if cfg.attention_bias else None)
            self.layers.append({fused: linear(tuple(p + n for n in names), bias if fused == "qkv" else None)
                                for fused, names in LAYER_MAP.items() if fused in LINEAR})
            norms.append(torch.stack([take(p + LAYER_MAP[n][0]) for n in ("attn_norm", "mlp_norm")]))
        # one tensor for every layer's norms and, where the layers allow, one stack per fused matrix: a compiled
        # step takes each tensor it reads as an input, at a cost per input per call (engine/linear.py stack_layers)
        self.layer_norms = torch.stack(norms)  # [layers, 2 (attention's, MLP's), hidden]
        self._stack_layers()
        self.norm = take("model.norm.weight")
        embed_name = "model.embed_tokens.weight"
        head_name = embed_name if cfg.tie_word_embeddings else "lm_head.weight"
        # the embedding is read a few rows per step: kept as its blocks when native, dense otherwise
        self.embed_q = quant.get(embed_name)
        if self.embed_q is not None and not cfg.tie_word_embeddings:
            left.pop(embed_name, None)
        self.embed = None if self.embed_q is not None else left[embed_name].to(device=self.device, dtype=dtype)
        if head_name == embed_name and self.embed is not None and head_name not in quant:
            self.lm_head = DenseLinear(self.embed, None)  # [V, hidden]: the embedding's own tensor, not a copy
        else:
            self.lm_head = linear((head_name,))  # [V, hidden]
        left.pop(embed_name, None)
        left.pop("lm_head.weight", None) if cfg.tie_word_embeddings else None
        left = {k: v for k, v in left.items() if not k.endswith("rotary_emb.inv_freq")}
        if left:
            raise ValueError(f"unused weights in checkpoint: {sorted(left)[:10]}")
        # rotary tables in float32, cast once: cos, sin [max_pos, head_dim]
        t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(t, rope_inv_freq(cfg))
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(self.device, dtype)
        self.sin = emb.sin().to(self.device, dtype)
        self.scale = cfg.head_dim ** -0.5
        # decode attention in one native op where the engine's kernels serve this dtype and head size
        self.attention_kernel = self.device.type == "cpu" and kernels.decode_attention(dtype, cfg.head_dim)
        self.compiled = None  # engine/compile.py CompiledDecode once enabled (engine/precision.py build_model)

    def _stack_layers(self) -> None:
        for name in LINEAR:
            for layer, op in zip(self.layers, stack_layers([layer[name] for layer in self.layers])):
                layer[name] = op

    @property
    def weight_bytes(self) -> int:
        """Bytes of the parameters as held (the tied embedding once): what a decode step streams."""
        n = sum(op.nbytes for layer in self.layers for op in layer.values())
        n += self.lm_head.nbytes
        n += sum(t.numel() * t.element_size() for t in (self.norm, self.layer_norms))
        if not self.cfg.tie_word_embeddings:
            n += self.embed_q.nbytes if self.embed_q is not None else self.embed.numel() * self.embed.element_size()
        return n

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, hidden] in the model's dtype."""
        if self.embed_q is not None:
            return self.embed_q.rows(ids).dequantize().to(self.dtype)
        return self.embed[ids]

    def _rms_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel; same math as Hugging Face's in float32
            return F.rms_norm(x, w.shape, w, self.cfg.rms_norm_eps)
        # as Hugging Face: normalize in float32, cast back, then scale
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return w * xf.to(x.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, D]; cos, sin: [T, 1, D]; rotate_half convention (HF layout)
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_layers: list[tuple[torch.Tensor, torch.Tensor]], logit_rows: torch.Tensor,
                attn: TorchAttention | None = None) -> torch.Tensor:
        """input_ids, positions: [T]; kv_layers[i] = (k, v) cache views [blocks, block_size, KVH, D].
        attn: the attention backend of the calling instance (torch by default).

        Returns float32 logits [len(logit_rows), V] for the packed rows in logit_rows.
        """
        cfg = self.cfg
        H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        T = input_ids.shape[0]
        attn = attn or _TORCH
        x = self.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        for layer, norms, (k_cache, v_cache) in zip(self.layers, self.layer_norms, kv_layers):
            h = self._rms_norm(x, norms[0])
            qkv = layer["qkv"](h)  # [T, (H + 2 KVH) D]
            qk, v = qkv.split([(H + KVH) * D, KVH * D], dim=-1)
            qk = self._rope(qk.view(T, H + KVH, D), cos, sin)  # q and k rotated in one pass
            q, k = qk.split([H, KVH], dim=1)
            o = attn.forward(q, k, v.view(T, KVH, D), k_cache, v_cache, meta, self.scale)
            x = x + layer["o"](o.reshape(T, H * D))
            h = self._rms_norm(x, norms[1])
            gate, up = layer["gate_up"](h).chunk(2, dim=-1)
            x = x + layer["down"](F.silu(gate) * up)
        x = self._rms_norm(x[logit_rows], self.norm)
        return self.lm_head(x).float()

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor, ctx_lens: torch.Tensor,
               cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step for B sequences, a pure function of its inputs (what engine/compile.py compiles):
        input_ids, positions, ctx_lens [B]; tables [B, nb] block ids; cache: the pool's whole tensor
        [blocks, layers, 2, block_size, KVH, D], only read. Returns float32 logits [B, V] and the new
        token's k, v of every layer, [B, layers, KVH, D] each, for the caller to write into the cache.
        Call it under torch.inference_mode() (not decorated: torch.compile traces it)."""
        cfg = self.cfg
        H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        B = input_ids.shape[0]
        x = self.embed_tokens(input_ids)  # [B, hidden]
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            h = self._rms_norm(x, self.layer_norms[i, 0])
            qk, v = layer["qkv"](h).split([(H + KVH) * D, KVH * D], dim=-1)
            qk = self._rope(qk.view(B, H + KVH, D), cos, sin)
            q, k = qk.split([H, KVH], dim=1)
            v = v.view(B, KVH, D)
            o = paged_decode_attention(q, k, v, cache[:, i, 0], cache[:, i, 1], tables, ctx_lens, self.scale,
                                       kernel=self.attention_kernel and cache.dtype == q.dtype)
            x = x + layer["o"](o.reshape(B, H * D))
            h = self._rms_norm(x, self.layer_norms[i, 1])
            gate, up = layer["gate_up"](h).chunk(2, dim=-1)
            x = x + layer["down"](F.silu(gate) * up)
            ks.append(k)
            vs.append(v)
        logits = self.lm_head(self._rms_norm(x, self.norm)).float()
        return logits, torch.stack(ks, dim=1), torch.stack(vs, dim=1)
