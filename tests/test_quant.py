"""Native GGUF weights: the packed blocks unpack to gguf-py's dequantization bit for bit, the kernels
multiply like the dense float32 matrix, and the real model served from its Q4_1 / Q8_0 blocks predicts
what the dense float32 model on the dequantized weights predicts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import kernels
from engine.attention import AttentionMetadata
from engine.config import CacheConfig
from engine.kv_cache import KVPool
from engine.linear import QuantLinear
from engine.model import LlamaModel
from engine.quant import KINDS, QuantStack, QuantTensor

gguf = pytest.importorskip("gguf")
needs_kernels = pytest.mark.skipif(not kernels.load(), reason=f"CPU kernels unavailable: {kernels.load_error()}")


def blocks(kind: str, n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """gguf-py's own quantization of a random [n, k] matrix: (raw blocks [n, bytes], its dequantization)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(w, qtype)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(n, k)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("k", [64, 96])  # 96: an odd number of blocks per row (padded with a zero block)
def test_unpacking_reproduces_gguf_dequantization_bit_for_bit(kind, k, monkeypatch):
    raw, ref = blocks(kind, 37, k)
    q = QuantTensor.from_blocks(raw, kind, k)
    assert q.shape == (37, k)
    assert torch.equal(q.dequantize(), torch.from_numpy(ref))  # the kernels' unpacking (or torch's)
    monkeypatch.setattr(kernels, "load", lambda: False)
    assert torch.equal(q.dequantize(), torch.from_numpy(ref))  # the torch fallback


@needs_kernels
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("n", [16, 37])  # 37: two groups of 16 rows and a last one padded
def test_interleaving_by_rows_is_lossless(kind, n):
    """The vector kernels' layout (16 rows' bytes side by side) holds the same blocks: back in GGUF's order bit
    for bit, and dequantized to gguf-py's values."""
    raw, ref = blocks(kind, n, 96)
    q = QuantTensor.from_blocks(raw, kind, 96)
    rows = q.interleave()
    assert rows.interleaved and rows.shape == (n, 96) and rows.qs.shape[0] == -(-n // 16)
    back = rows.deinterleave()
    assert torch.equal(back.qs, q.qs) and torch.equal(back.d, q.d)
    assert (back.m is None) == (q.m is None) and (q.m is None or torch.equal(back.m, q.m))
    assert torch.equal(rows.dequantize(), torch.from_numpy(ref))
    with pytest.raises(ValueError, match="GGUF"):
        QuantTensor.cat([rows, rows])


def test_row_reordering_and_fusing_are_lossless():
    (ra, da), (rb, db) = blocks("Q4_1", 8, 64, 1), blocks("Q4_1", 5, 64, 2)
    a, b = QuantTensor.from_blocks(ra, "Q4_1", 64), QuantTensor.from_blocks(rb, "Q4_1", 64)
    perm = torch.randperm(8)
    assert torch.equal(a.rows(perm).dequantize(), torch.from_numpy(da)[perm])
    assert torch.equal(QuantTensor.cat([a, b]).dequantize(), torch.from_numpy(np.concatenate([da, db])))
    with pytest.raises(ValueError):
        QuantTensor.cat([a, QuantTensor.from_blocks(blocks("Q8_0", 2, 64)[0], "Q8_0", 64)])


def int16_product(x: torch.Tensor, q: QuantTensor) -> torch.Tensor:
    """The kernels' arithmetic, in float64: each block of 32 values of x rounded to int16 (scale max|x| / 32767,
    ties to even), integer dot products with the block's 4- or 8-bit values, each scaled by d * scale, plus the
    weights' offset (Q4_1 m, Q4_0 -8 d) times the rounded block's sum (scale * the sum of its int16 values)."""
    m, k = x.shape
    nb = q.qs.shape[1]
    xb = torch.nn.functional.pad(x, (0, nb * 32 - k)).view(m, nb, 32)
    amax = xb.abs().amax(-1)
    scale = amax / 32767
    # (a tensor divided by a tensor: `32767 / amax` would multiply by amax's reciprocal, rounding twice)
    inv = torch.where(amax > 0, torch.full_like(amax, 32767) / amax, torch.zeros_like(amax))
    xq = torch.round(xb * inv[..., None]).double()
    if q.kind == "Q8_0":
        qv = q.qs.view(torch.int8).double()
    else:
        qv = torch.cat([q.qs & 15, q.qs >> 4], -1).double()  # byte j: value j (low nibble), j + 16 (high)
    d = q.d.double()
    off = q.m.double() if q.kind == "Q4_1" else -8 * d if q.kind == "Q4_0" else torch.zeros_like(d)
    dots = torch.einsum("nbj,ibj->inb", qv, xq)  # exact integers
    return (dots * d * scale.double()[:, None, :]).sum(-1) + (scale.double() * xq.sum(-1)) @ off.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_kernels
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 9, 13, 17, 23, 28])  # every tile height and tail
@pytest.mark.parametrize("k", [96, 576])  # 576 (the model's width): a full run of 16 blocks' scales, then 2
@pytest.mark.parametrize("layout", ["gguf", "rows"])  # rows: 61 = 3 groups of 16 (a pair and an odd one) + 13
def test_kernel_product_is_the_int16_rounded_product(kind, m, k, layout):
    raw, ref = blocks(kind, 61, k)
    q = QuantTensor.from_blocks(raw, kind, k)
    if layout == "rows":
        q = q.interleave()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    got = q.matmul(x)
    dense = x @ torch.from_numpy(ref).T
    if kernels.int16_products():  # exactly the int16 arithmetic (float32 sums), within ~1e-4 of the float32 product
        assert rel(got, int16_product(x, q.deinterleave())) < 1e-6
        assert rel(got, dense) < 2e-4
    else:  # the scalar build: dequantized to gguf's float32 values, the dense product up to summation order
        assert rel(got, dense) < 1e-6
    # a row is rounded and summed the same way whatever else is in the batch: a request's logits do not
    # depend on what it is batched with
    for i in {0, m - 1}:
        assert torch.equal(q.matmul(x[i:i + 1]), got[i:i + 1])
    # the op the model calls: any activation dtype in, the same dtype out
    lin = QuantLinear(q, None, torch.bfloat16)
    assert lin(x.bfloat16()).dtype == torch.bfloat16 and lin(x).shape == (m, 61)


@needs_kernels
def test_many_rows_take_the_dense_product_on_x_rounded_as_the_kernels_round_it():
    """Past QUANT_KERNEL_MAX_ROWS (prefill chunks) QuantLinear multiplies the dequantized matrix by x rounded
    like the kernels' (round_int16): a row's result is the kernels' up to float32 summation order, whichever
    path its batch took."""
    from engine.linear import QUANT_KERNEL_MAX_ROWS

    raw, _ = blocks("Q4_1", 45, 576)
    q = QuantTensor.from_blocks(raw, "Q4_1", 576)
    x = torch.randn(QUANT_KERNEL_MAX_ROWS + 3, 576)
    lin = QuantLinear(q, None, torch.float32)
    many = lin(x)  # the dense product
    few = lin(x[:3])  # the kernels
    assert rel(many[:3], few) < 1e-6
    if kernels.int16_products():  # round_int16 is idempotent and moves x by at most half a step per block
        r = torch.ops.distserve.round_int16(x)
        assert torch.equal(torch.ops.distserve.round_int16(r), r)
        step = x.view(-1, 32).abs().amax(-1, keepdim=True) / 32767
        assert ((r - x).view(-1, 32).abs() <= step * 0.51).all()  # (+ float32 rounding of x / s and s * q)


@needs_kernels
def test_a_compiled_step_past_the_kernels_rows_takes_the_dense_product():
    """A compiled decode step with a symbolic batch meets QUANT_KERNEL_MAX_ROWS: past it, tracing goes through the
    dense product on the interleaved blocks (every op there has a shape function for torch.compile)."""
    from engine.linear import QUANT_KERNEL_MAX_ROWS

    raw, _ = blocks("Q4_1", 32, 64)
    lin = QuantLinear(QuantTensor.from_blocks(raw, "Q4_1", 64), None, torch.float32)
    step = torch.compile(lambda x: lin(x) * 2, fullgraph=True, dynamic=True)
    for m in (3, QUANT_KERNEL_MAX_ROWS + 5):
        x = torch.randn(m, 64)
        assert rel(step(x), lin(x) * 2) < 1e-6


@needs_kernels
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("layout", ["gguf", "rows"])
def test_a_non_finite_row_stays_in_its_own_row(bad, layout):
    """A row of x with an inf or a NaN (a broken request) comes out non-finite, as a float32 product would (NaN
    on the int16 path), and does not touch its neighbours' outputs."""
    raw, _ = blocks("Q4_1", 45, 576)
    q = QuantTensor.from_blocks(raw, "Q4_1", 576)
    if layout == "rows":
        q = q.interleave()
    x = torch.randn(3, 576)
    x[1, 3] = bad
    got = q.matmul(x)
    assert not torch.isfinite(got[1]).any()
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[2]).all()
    assert torch.equal(got[0], q.matmul(x[:1])[0])
    if kernels.int16_products():  # the dense path's rounding: the broken block NaN, the rest of x rounded
        r = torch.ops.distserve.round_int16(x)
        assert torch.isnan(r[1, :32]).all() and torch.isfinite(r[1, 32:]).all() and torch.isfinite(r[0]).all()


def test_the_avx2_kernels_are_correct_too():
    """CI machines may have AVX2 only: build the kernels' AVX2 path here (-march=haswell) and run the
    unpacking and product tests against it in a subprocess (one build per process)."""
    import os
    import subprocess
    import sys

    if os.environ.get("DISTSERVE_KERNEL_MARCH"):
        pytest.skip("already the subprocess")
    if not {"avx2", "fma", "f16c"} <= kernels.cpu_flags():
        pytest.skip("this CPU cannot run AVX2 code")
    env = {**os.environ, "DISTSERVE_KERNEL_MARCH": "haswell"}
    code = ("from engine import kernels; assert kernels.load(), kernels.load_error(); "
            "assert kernels.isa() == 'avx2', kernels.isa()")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    tests = "unpacking or interleaving or kernel_product or non_finite or many_rows or stack"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", __file__, "-m", "not slow", "-k", tests],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


@pytest.mark.slow
@needs_kernels
def test_native_q4_1_model_agrees_with_dense_float32_top1(ckpt):
    """Teacher-forced top-1 over >= 500 positions of real text: the native model (the default file is
    Q4_1 with a Q8_0 embedding) against the dense float32 forward on gguf's dequantized weights, both
    as decode steps (3 sequences a token at a time) and as 16-token chunks (48 rows per matmul)."""
    assert ckpt.native_kinds and set(ckpt.native_kinds) <= set(KINDS)
    text = ("The history of computing is a story of abstraction: from switches to instructions, from "
            "assembly to compilers, from single machines to networks of them. Each layer hides the "
            "one below and lets people think about bigger problems; each new problem asks for a new "
            "layer. Networks made programs talk, and the web made documents link to each other. ") * 8
    ids = ckpt.tokenizer.encode(text)
    seqs = [ids[i * 150: i * 150 + 174] for i in range(3)]
    assert sum(map(len, seqs)) >= 500
    dense = LlamaModel(ckpt.config, ckpt.weights, torch.float32)
    native = LlamaModel(ckpt.config, ckpt.weights, torch.float32, quantized=ckpt.quantized, native=True)
    assert native.native and native.weight_bytes < dense.weight_bytes / 4
    ref = _teacher_forced(dense, ckpt.config, seqs, 174).argmax(-1)
    for chunk in (1, 16):
        got = _teacher_forced(native, ckpt.config, seqs, chunk).argmax(-1)
        agree = (got == ref).float().mean().item()
        assert agree >= 0.99, f"chunk {chunk}: top-1 agreement {agree:.4f} over {got.numel()} positions"


def _teacher_forced(model: LlamaModel, cfg, seqs: list[list[int]], chunk: int) -> torch.Tensor:
    """Logits [len(seqs), L, V] of every position, feeding `chunk` tokens of every sequence per step."""
    n = len(seqs[0])
    pool = KVPool(cfg, CacheConfig(num_blocks=64), model.dtype)
    tables = [pool.allocator.allocate(str(i), pool.allocator.blocks_for(n)) for i in range(len(seqs))]
    layers = [pool.layer(i) for i in range(cfg.num_layers)]
    out = []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        meta = AttentionMetadata.build([e - s] * len(seqs), [e] * len(seqs), tables, pool.block_size,
                                       torch.device("cpu"), model.dtype)
        ids = torch.tensor([t for q in seqs for t in q[s:e]])
        pos = torch.arange(s, e).repeat(len(seqs))
        logits = model.forward(ids, pos, meta, layers, torch.arange(len(ids)))
        out.append(logits.view(len(seqs), e - s, -1))
    return torch.cat(out, dim=1)


def test_auto_weights_are_dense_bf16_where_the_cpu_has_bf16_else_native(monkeypatch):
    """The measured policy (engine/precision.py): bf16 hardware -> dense bf16; otherwise the GGUF's own blocks;
    an explicit choice always wins, and native without blocks is a clear error."""
    from types import SimpleNamespace

    from engine import precision

    monkeypatch.setattr(precision.kernels, "load", lambda: True)
    quantized, plain = SimpleNamespace(quantized={"w": object()}), SimpleNamespace(quantized={})
    cpu = torch.device("cpu")
    for has_bf16, want in ((True, False), (False, True)):
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda v=has_bf16: v)
        assert precision.resolve_weights("auto", quantized, cpu) is want
        assert precision.resolve_weights("auto", quantized, cpu, "float32") is True  # fp32 activations: native
        assert precision.resolve_weights("dense", quantized, cpu) is False
        assert precision.resolve_weights("native", quantized, cpu) is True
        assert precision.resolve_weights("auto", plain, cpu, "float32") is False
    with pytest.raises(ValueError, match="no Q4_0 / Q4_1 / Q8_0"):
        precision.resolve_weights("native", plain, cpu)


def test_a_stack_of_layers_serves_each_layers_own_matrix():
    """QuantStack: every layer's matrix read back as views of the stack multiplies as the matrix alone, and
    matrices that differ in kind or shape are not stacked."""
    parts = [QuantTensor.from_blocks(blocks("Q4_1", 24, 64, seed=s)[0], "Q4_1", 64) for s in range(3)]
    if kernels.load():  # the layout a QuantLinear holds (what the model stacks)
        parts = [QuantLinear(p, None, torch.float32).weight for p in parts]
    stack = QuantStack.of(parts)
    assert stack is not None and len(stack) == 3
    x = torch.randn(2, 64)
    for i, p in enumerate(parts):
        assert torch.equal(stack.layer(i).dequantize(), p.dequantize())
        if kernels.load():
            y = QuantLinear(stack, None, torch.float32, layer=i)(x)
            assert torch.equal(y, QuantLinear(p, None, torch.float32)(x))
    q8 = QuantTensor.from_blocks(blocks("Q8_0", 24, 64)[0], "Q8_0", 64)
    wider = QuantTensor.from_blocks(blocks("Q4_1", 24, 96)[0], "Q4_1", 96)
    assert QuantStack.of(parts + [q8]) is None and QuantStack.of(parts + [wider]) is None
    assert QuantStack.of([parts[0], parts[1].deinterleave()]) is None or not parts[0].interleaved
    with pytest.raises(ValueError, match="layer"):
        QuantLinear(stack, None, torch.float32)
