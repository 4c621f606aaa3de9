"""Compiled decode steps (engine/compile.py) give the eager engine's tokens, and the paged decode
attention they run equals the SDPA path. The compile test uses a 2-layer model (inductor's FX graph
cache makes reruns quick); the real model's compile time is measured in bench/engine_bench.py."""
from __future__ import annotations

import os

import gguf
import pytest
import torch

from engine import kernels
from engine.attention import AttentionMetadata, TorchAttention, paged_decode_attention
from engine.config import SamplingParams
from engine.loader import Checkpoint, load_tokenizer
from engine.model import LlamaModel
from engine.quant import QuantStack, QuantTensor
from serving.llm import LLM
from tests.helpers import hf_model, tiny_config


def test_paged_decode_attention_equals_sdpa_decode():
    g = torch.Generator().manual_seed(0)
    kvh, h, d, bs = 2, 4, 8, 4
    k_cache, v_cache = torch.randn(32, bs, kvh, d, generator=g), torch.randn(32, bs, kvh, d, generator=g)
    ctx = [7, 1, 16, 9]
    tables = [[5, 2], [9], [0, 1, 3, 4], [31, 30, 8]]
    q = torch.randn(4, h, d, generator=g)
    k, v = torch.randn(4, kvh, d, generator=g), torch.randn(4, kvh, d, generator=g)
    width = max(len(t) for t in tables)
    dense = torch.tensor([t + [t[0]] * (width - len(t)) for t in tables])
    ours = paged_decode_attention(q, k, v, k_cache, v_cache, dense, torch.tensor(ctx), d ** -0.5)
    meta = AttentionMetadata.build([1] * 4, ctx, tables, bs, torch.device("cpu"))
    ref = TorchAttention().forward(q, k, v, k_cache.clone(), v_cache.clone(), meta, d ** -0.5)  # writes, then reads
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def _quantized(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, QuantTensor]]:
    """A GGUF-like checkpoint of sd: layer matrices in Q4_1, the (tied) embedding in Q8_0, as the default file
    holds them; the dense weights are their dequantization, as the loader gives them."""
    dense, quant = dict(sd), {}
    for name, w in sd.items():
        kind = "Q8_0" if "embed" in name else "Q4_1" if name.endswith("proj.weight") else None
        if kind:
            raw = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[kind])
            quant[name] = QuantTensor.from_blocks(raw, kind, w.shape[1])
            dense[name] = quant[name].dequantize()
    return dense, quant


@pytest.mark.parametrize("weights", ["dense", "native"])
def test_compiled_decode_gives_the_eager_greedy_tokens(weights):
    """native: the matrices run from their blocks, every layer's as views of one stack (engine/quant.py QuantStack)."""
    if weights == "native" and not kernels.load():
        pytest.skip(f"the native kernels did not build here: {kernels.load_error()}")
    cfg = tiny_config(tie_word_embeddings=True, num_layers=2)
    sd = hf_model(cfg).state_dict()
    sd.pop("lm_head.weight")
    sd, quant = _quantized(sd) if weights == "native" else (sd, {})
    tok = load_tokenizer()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (1, 5, 17, 33, 2)]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    core = sorted(os.sched_getaffinity(0))[:1]
    outs = {}
    for compiled in (False, True):
        ckpt = Checkpoint(cfg, dict(sd), tok, "t", quantized=dict(quant))
        with LLM(dtype="float32", weights=weights, compile=compiled, checkpoint=ckpt, devices=[f"cpu:{core[0]}"],
                 num_kv_blocks=64, block_size=4) as llm:
            inst = llm.engine.instances[0]
            inst.executor.submit(lambda: None).result()  # the warm-up, queued first on the instance's thread, is done
            if compiled:
                assert set(inst.compiled.compile_s) == {"batch1", "batch2"}
            # it compiled every graph the steps need: serving never compiles (seconds, in the middle of requests)
            with torch.compiler.set_stance("fail_on_recompile"):
                batched = [o.token_ids for o in llm.generate(prompts, sp)]
                alone = [llm.generate([p], sp)[0].token_ids for p in prompts[:2]]
            assert inst.model.native == (weights == "native")
            assert isinstance(inst.model.layers[1]["gate_up"].weight, QuantStack) == (weights == "native")
        outs[compiled] = (batched, alone)
    assert outs[True] == outs[False]


def test_the_compile_cache_is_kept_per_instruction_set(monkeypatch):
    """inductor's cache key does not follow ATEN_CPU_CAPABILITY: a cache filled at the CPU's full ISA and
    read with the variable at avx2 made the compiled steps emit wrong tokens. Each ISA gets its own folder."""
    from engine import compile as ec
    from engine import kernels

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    full = ec.default_cache_dir()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    capped = ec.default_cache_dir()
    assert full != capped and capped.endswith("-aten_avx2")
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    assert ec.default_cache_dir() != capped  # another CPU, another folder
    # inductor's own default, written into the variable by inductor itself, counts as unset; a user's wins
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_default())
    assert ec.resolve_cache_dir() == ec.default_cache_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/srv/cache/inductor")
    assert ec.resolve_cache_dir() == "/srv/cache/inductor"
    assert ec.resolve_cache_dir("/explicit") == "/explicit"


def test_the_compiled_steps_inputs_do_not_grow_with_the_layers():
    """Every layer's matrices and norms are views of one stack per kind (engine/linear.py stack_layers): the
    traced decode step reads a fixed number of tensors whatever the depth, where a tensor per weight made a
    30-layer model's step take 431 inputs (torch.compile's runtime pays for each on every call); the float32
    panels the decode batches multiply by are stacked alike."""
    def inputs(num_layers: int) -> int:
        cfg = tiny_config(num_layers=num_layers)
        model = LlamaModel(cfg, dict(hf_model(cfg).state_dict()), torch.float32)
        seen = []

        def backend(gm, example_inputs):
            seen.append(len(example_inputs))
            return gm.forward

        torch._dynamo.reset()
        cache = torch.zeros(8, num_layers, 2, 4, cfg.num_kv_heads, cfg.head_dim)
        ids, tables, ctx = torch.tensor([3, 5]), torch.tensor([[0, 1], [2, 3]]), torch.tensor([3, 6])
        with torch.inference_mode():
            torch.compile(model.decode, backend=backend, fullgraph=True)(ids, ctx - 1, tables, ctx, cache)
        return seen[0]

    assert inputs(2) == inputs(5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 32, 128])
def test_the_native_decode_attention_equals_the_python_one(dtype, d):
    """distserve::decode_attention (engine/cpu_kernels.cpp) computes paged_decode_attention's result: every
    sequence's cached rows read in place from scattered blocks, the new token's own k, v beside them, GQA
    groups, ragged contexts (a block boundary, a lone new token, contexts past the rows prefetched ahead), q, k
    and v as views of wider rows."""
    if not kernels.decode_attention(dtype, d):
        pytest.skip(f"no native decode attention for {dtype}, head_dim {d} here")
    g = torch.Generator().manual_seed(d)
    kvh, h, bs, layers = 3, 9, 16, 2
    cache = torch.randn(40, layers, 2, bs, kvh, d, generator=g).to(dtype)  # the pool's layout
    ctx = [1, 17, 16, 40, 97, 5]
    tables = [[7], [3, 9], [12], [1, 39, 20], [0, 2, 4, 6, 8, 10, 11], [33]]
    width = max(len(t) for t in tables)
    dense = torch.tensor([t + [t[0]] * (width - len(t)) for t in tables])
    B = len(ctx)
    q, k = torch.randn(B, h + kvh, d, generator=g).to(dtype).split([h, kvh], dim=1)  # views, as the step has them
    v = torch.randn(B, 2 * kvh * d, generator=g).to(dtype)[:, kvh * d:].view(B, kvh, d)
    for layer in range(layers):
        args = (q, k, v, cache[:, layer, 0], cache[:, layer, 1], dense, torch.tensor(ctx), d ** -0.5)
        ours, ref = paged_decode_attention(*args, kernel=True), paged_decode_attention(*args)
        assert ours.dtype == dtype and ours.shape == q.shape
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # float32 sums in another order / bf16 rounding of the result
        torch.testing.assert_close(ours.float(), ref.float(), atol=tol, rtol=tol)


def test_the_native_decode_attention_rejects_a_context_its_table_does_not_hold():
    if not kernels.decode_attention(torch.float32, 64):
        pytest.skip("no native decode attention here")
    cache = torch.zeros(4, 16, 1, 64)
    q, kv = torch.zeros(1, 2, 64), torch.zeros(1, 1, 64)
    with pytest.raises(RuntimeError, match="ctx_lens"):  # 40 tokens, one block of 16
        torch.ops.distserve.decode_attention(q, kv, kv, cache, cache, torch.tensor([[0]]), torch.tensor([40]), 0.1)
    with pytest.raises(RuntimeError, match="block id"):
        torch.ops.distserve.decode_attention(q, kv, kv, cache, cache, torch.tensor([[9]]), torch.tensor([5]), 0.1)
