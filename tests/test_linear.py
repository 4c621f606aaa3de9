"""engine/linear.py DenseLinear in bf16 on CPU: oneDNN's prepacked product, and for 1-4 rows the engine's
streaming GEMV (engine/cpu_kernels.cpp) on the row-major copy. Both must give the float32 product of the
same bf16 numbers, rounded once to bf16, whatever the batch size."""
from __future__ import annotations

import pytest
import torch

from engine import kernels
from engine.linear import DenseLinear, panels

needs_gemv = pytest.mark.skipif(not kernels.bf16_gemv(), reason="no AVX-512 BF16 GEMV on this CPU")


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())


@needs_gemv
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k,n", [(576, 963), (1536, 64), (96, 7)])  # odd N: the one-row tail tile
def test_bf16_linear_is_the_float32_product_rounded_once(m, bias, k, n):
    g = torch.Generator().manual_seed(m * 31 + n)
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    x = torch.randn(m, k, generator=g).bfloat16()
    lin = DenseLinear(w, b)
    assert lin.weight is not None and lin.packed is not None  # both copies: GEMV for <= 4 rows, oneDNN above
    y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    want = reference(x, w, b)
    # one bf16 rounding of an exact-in-float32 sum: within half an ulp of bf16 (2^-8 relative) plus the sum's order
    assert ((y.float() - want).abs() <= want.abs() * 2 ** -8 + 1e-3 * want.abs().max()).all()
    # every row on its own: a request's logits do not depend on what it is batched with (up to M = 4)
    if m <= 4:
        assert torch.equal(lin(x[:1]), y[:1])


@needs_gemv
def test_the_gemv_and_onednn_paths_agree_on_the_same_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 576, generator=g).bfloat16()
    x = torch.randn(4, 576, generator=g).bfloat16()
    lin = DenseLinear(w)
    small = lin(x)  # 4 rows: the GEMV
    large = lin(torch.cat([x, x]))[:4]  # 8 rows: oneDNN
    assert (small.float() - large.float()).abs().max() <= 2 ** -7 * large.float().abs().max()


def test_tied_lm_head_shares_the_embedding_tensor():
    """No second copy of the vocabulary matrix: the LM head reads the embedding table itself."""
    from engine.model import LlamaModel
    from tests.helpers import hf_model, tiny_config

    cfg = tiny_config(tie_word_embeddings=True)
    sd = hf_model(cfg).state_dict()
    sd.pop("lm_head.weight")
    model = LlamaModel(cfg, sd, torch.bfloat16)
    if model.lm_head.weight is not None:  # kept where the GEMV runs: the same storage as the embedding
        assert model.lm_head.weight.data_ptr() == model.embed.data_ptr()
    torch.testing.assert_close(model.lm_head.dense().float(), model.embed.float())


def test_a_float32_models_layers_read_their_matrices_from_one_stack():
    """stack_layers: every layer's fused matrix becomes a view of one [layers, N, K] tensor (one input of a
    compiled step, not one per layer), its float32 panels likewise, and multiplies exactly as before; prepacked
    bf16 weights stay apart."""
    from engine.linear import stack_layers
    from engine.model import LlamaModel
    from tests.helpers import hf_model, tiny_config

    cfg = tiny_config(num_layers=3)
    sd = hf_model(cfg).state_dict()
    model = LlamaModel(cfg, dict(sd), torch.float32)
    x = torch.randn(2, cfg.hidden_size)
    packs = set()
    for i, layer in enumerate(model.layers):
        op = layer["gate_up"]
        assert op.layer == i and op._w.shape[0] == cfg.num_layers
        want = torch.cat([sd[f"model.layers.{i}.mlp.gate_proj.weight"], sd[f"model.layers.{i}.mlp.up_proj.weight"]])
        assert torch.equal(op.weight, want)
        for rows in (x[:1], x):  # the panels where made (F.linear on the view elsewhere)
            torch.testing.assert_close(op(rows), torch.nn.functional.linear(rows, want))
        if op.packed is not None:
            assert torch.equal(op.packed, panels(want))
        packs.add(id(op._p) if op._p is not None else None)
    assert model.layers[0]["gate_up"]._w is model.layers[2]["gate_up"]._w
    assert len(packs) == 1  # one stack of panels (or none)
    bf16 = [DenseLinear(torch.randn(8, 64).bfloat16()) for _ in range(2)]
    if bf16[0].packed is not None and bf16[0].weight is None:  # the oneDNN pack replaced the row-major copy
        assert stack_layers(bf16) is bf16
    with pytest.raises(ValueError, match="layer"):
        DenseLinear(torch.randn(3, 8, 64))


needs_panels = pytest.mark.skipif(not kernels.float32_panels(), reason="no vector build of the engine's kernels here")


@needs_panels
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n", [208, 48, 16])  # 208: 4 AVX-512 column tiles and a 16-wide one; 16: only that
def test_a_float32_weight_in_panels_multiplies_any_row_count(bias, n):
    """Decode batches of 1-64 rows run the engine's register-tiled kernel on the panels packed at load; prefill
    chunks run F.linear on the row-major copy kept beside them. Every count gives F.linear's product, and a
    row's product does not depend on the rows batched with it."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(n, 576, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    lin = DenseLinear(w, b)
    assert lin.weight is w and torch.equal(lin.packed, panels(w))
    assert torch.equal(lin.packed[-1, 5], w[-16:, 5])  # the last panel, k = 5: the last 16 rows
    x = torch.randn(300, 576, generator=g)
    alone = {i: torch.ops.distserve.panel_linear(x[i:i + 1], lin.packed, b) for i in (0, 1, 7)}
    for m in (1, 2, 3, 7, 8, 9, 13, 32, 33, 64, 65, 300):
        y, want = lin(x[:m]), torch.nn.functional.linear(x[:m], w, b)
        assert y.shape == (m, n) and y.dtype == torch.float32
        if m > 64:
            assert torch.equal(y, want)  # the same call as F.linear
        else:
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)  # float32, summed in another order
            for i, row in alone.items():
                if i < m:
                    assert torch.equal(y[i], row[0])  # the same sum whatever the tile height
    assert DenseLinear(w, b, prepack=False).packed is None
    assert DenseLinear(torch.randn(24, 576, generator=g)).packed is None  # N not a multiple of 16: F.linear only


def test_panel_linear_rejects_a_weight_that_is_not_panels():
    if not kernels.load():
        pytest.skip("no engine kernels here")
    with pytest.raises(RuntimeError, match="panels"):
        torch.ops.distserve.panel_linear(torch.randn(2, 64), torch.randn(32, 64), None)
    with pytest.raises(RuntimeError, match=r"\[M, K\]"):
        torch.ops.distserve.panel_linear(torch.randn(2, 63), panels(torch.randn(32, 64)), None)


@needs_gemv
def test_bf16_layers_stack_their_row_major_copies_and_keep_their_own_packs():
    """Where the GEMV keeps each bf16 matrix row-major beside oneDNN's pack, the row-major copies are stacked
    (one input of a compiled step) and each layer keeps its own pack: every batch size multiplies as before."""
    from engine.linear import stack_layers

    g = torch.Generator().manual_seed(3)
    ops = [DenseLinear(torch.randn(96, 64, generator=g).bfloat16()) for _ in range(3)]
    stacked = stack_layers(ops)
    assert stacked is not ops and stacked[0]._w is stacked[2]._w and stacked[0]._w.shape == (3, 96, 64)
    for op, st in zip(ops, stacked):
        assert st.packed is op.packed and torch.equal(st.weight, op.weight)
        for m in (1, 4, 5, 8):  # the GEMV, then oneDNN
            x = torch.randn(m, 64, generator=g).bfloat16()
            assert torch.equal(st(x), op(x))
