"""The Llama-family forward over a paged cache equals transformers' on tiny random models."""
from __future__ import annotations

import pytest
import torch

from engine.attention import AttentionMetadata, TorchAttention, gather
from engine.config import CacheConfig
from engine.kv_cache import KVPool
from engine.model import LlamaModel
from tests.helpers import hf_model, tiny_config

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
CPU = torch.device("cpu")


def setup(arch: str, **kw):
    cfg = tiny_config(arch, **kw)
    ref = hf_model(cfg)
    model = LlamaModel(cfg, {k: v.clone() for k, v in ref.state_dict().items()})
    pool = KVPool(cfg, CacheConfig(num_blocks=64, block_size=4), torch.float32)
    return cfg, ref, model, pool


def run(model, pool, ids, pos, q_lens, ctx_lens, tables, rows):
    meta = AttentionMetadata.build(q_lens, ctx_lens, tables, pool.block_size, CPU)
    layers = [pool.layer(i) for i in range(model.cfg.num_layers)]
    return model.forward(torch.tensor(ids), torch.tensor(pos), meta, layers, torch.tensor(rows))


def ref_last_logits(ref, seq):
    with torch.no_grad():
        return ref(torch.tensor([seq])).logits[0, -1]


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("qwen2", {}), ("llama", {"rope_scaling": LLAMA3}),
                                     ("llama", {"tie_word_embeddings": True})])
def test_packed_prefill_then_batched_decode_match_reference(arch, kw):
    cfg, ref, model, pool = setup(arch, **kw)
    g = torch.Generator().manual_seed(1)
    lens = [5, 13, 1, 30]
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
    tables = [pool.allocator.allocate(str(i), pool.allocator.blocks_for(n + 8)) for i, n in enumerate(lens)]
    out = run(model, pool, sum(seqs, []), sum((list(range(n)) for n in lens), []), lens, lens, tables,
              [sum(lens[: i + 1]) - 1 for i in range(len(lens))])
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out[i], ref_last_logits(ref, s), atol=1e-4, rtol=1e-4)
    for _ in range(4):  # decode: sequences of different lengths in one batch
        nxt = torch.randint(0, cfg.vocab_size, (len(seqs),), generator=g).tolist()
        seqs = [s + [t] for s, t in zip(seqs, nxt)]
        ctx = [len(s) for s in seqs]
        out = run(model, pool, nxt, [c - 1 for c in ctx], [1] * len(seqs), ctx, tables, list(range(len(seqs))))
        for i, s in enumerate(seqs):
            torch.testing.assert_close(out[i], ref_last_logits(ref, s), atol=1e-4, rtol=1e-4)


def test_prefill_chunk_after_cached_context_matches_reference():
    cfg, ref, model, pool = setup("llama")
    seq = list(range(3, 25))
    table = pool.allocator.allocate("a", pool.allocator.blocks_for(len(seq)))
    run(model, pool, seq[:10], list(range(10)), [10], [10], [table], [9])  # first chunk
    out = run(model, pool, seq[10:], list(range(10, len(seq))), [12], [len(seq)], [table], [11])
    torch.testing.assert_close(out[0], ref_last_logits(ref, seq), atol=1e-4, rtol=1e-4)


def test_paged_decode_attention_equals_contiguous_attention():
    g = torch.Generator().manual_seed(0)
    kvh, h, d, bs = 2, 4, 8, 4
    k_cache = torch.zeros(32, bs, kvh, d)
    v_cache = torch.zeros(32, bs, kvh, d)
    ctx = [7, 1, 16, 9]
    tables = [[5, 2], [9], [0, 1, 3, 4], [31, 30, 8]]  # scattered, non-monotonic blocks
    ks = [torch.randn(c, kvh, d, generator=g) for c in ctx]
    vs = [torch.randn(c, kvh, d, generator=g) for c in ctx]
    for t, k, v in zip(tables, ks, vs):  # write all but the last token into the cache
        for p in range(k.shape[0] - 1):
            k_cache[t[p // bs], p % bs] = k[p]
            v_cache[t[p // bs], p % bs] = v[p]
    q = torch.randn(len(ctx), h, d, generator=g)
    meta = AttentionMetadata.build([1] * 4, ctx, tables, bs, CPU)
    out = TorchAttention().forward(q, torch.stack([k[-1] for k in ks]), torch.stack([v[-1] for v in vs]),
                                   k_cache, v_cache, meta, d ** -0.5)
    for i, (k, v) in enumerate(zip(ks, vs)):
        kk = k.repeat_interleave(h // kvh, dim=1).transpose(0, 1)  # [H, ctx, D]
        vv = v.repeat_interleave(h // kvh, dim=1).transpose(0, 1)
        w = torch.softmax(q[i].unsqueeze(1) @ kk.transpose(1, 2) * d ** -0.5, dim=-1)  # [H, 1, ctx]
        torch.testing.assert_close(out[i], (w @ vv).squeeze(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gather(k_cache, tables[i], ctx[i]), k)  # the cache holds every token


def test_loading_rejects_missing_and_leftover_weights():
    cfg = tiny_config()
    weights = hf_model(cfg).state_dict()
    missing = {k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        LlamaModel(cfg, missing)
    extra = dict(weights, **{"model.layers.9.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="model.layers.9.extra.weight"):
        LlamaModel(cfg, extra)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_xformers_backend_matches_torch_backend_on_cuda():
    pytest.importorskip("xformers")
    from engine.attention_xformers import XFormersAttention

    g = torch.Generator().manual_seed(0)
    dev = torch.device("cuda")
    kvh, h, d, bs = 2, 4, 64, 16
    caches = [torch.zeros(32, bs, kvh, d, device=dev, dtype=torch.float16) for _ in range(4)]
    q_lens, ctx_lens, tables = [5, 1, 3], [5, 20, 40], [[0], [3, 4], [7, 8, 9]]
    T = sum(q_lens)
    q = torch.randn(T, h, d, generator=g).half().to(dev)
    k = torch.randn(T, kvh, d, generator=g).half().to(dev)
    v = torch.randn(T, kvh, d, generator=g).half().to(dev)
    for c in caches:
        c.normal_()
    meta = AttentionMetadata.build(q_lens, ctx_lens, tables, bs, dev, torch.float16)
    ref = TorchAttention().forward(q, k, v, caches[0], caches[1], meta, d ** -0.5)
    caches[2].copy_(caches[0])
    caches[3].copy_(caches[1])
    out = XFormersAttention().forward(q, k, v, caches[2], caches[3], meta, d ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
