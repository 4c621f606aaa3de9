"""Sampler: greedy, seeds, filters, distributions, penalties and logprobs on tiny random logits."""
from __future__ import annotations

import math

import pytest
import torch

from engine.config import SamplingParams
from engine.request import Request
from engine.sampler import Sampler, _top_k_top_p

V = 32


def _req(prompt: list[int] | None = None, output: list[int] | None = None, **kw) -> Request:
    r = Request("r", prompt or [], SamplingParams(**kw))
    r.output_ids = list(output or [])
    return r


def _logits(b: int, seed: int = 0, v: int = V) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def _draw(probs: list[float], n: int, **kw) -> torch.Tensor:
    """n samples from one row with the given probabilities, all in one batch; returns [len(probs)] counts."""
    sampler = Sampler(len(probs), seed=0)
    logits = torch.tensor(probs).log().expand(n, -1).contiguous()
    toks, _ = sampler(logits, [_req(**kw) for _ in range(n)])
    return torch.bincount(torch.tensor(toks), minlength=len(probs))


def test_greedy_is_argmax_in_any_dtype():
    logits = _logits(6)
    for dtype in (torch.float32, torch.bfloat16):
        toks, lps = Sampler(V)(logits.to(dtype), [_req(temperature=0.0) for _ in range(6)])
        assert toks == logits.to(dtype).argmax(-1).tolist() and lps == [None] * 6


def test_greedy_ties_go_to_the_lowest_token_id_as_argmax_breaks_them():
    logits = torch.zeros(3, V)
    logits[0, [5, 9]] = 2.0  # two equal maxima
    logits[1, [31, 0]] = 1.0
    logits[2] = 1.0  # all equal
    greedy, penalized = [_req(temperature=0.0) for _ in range(3)], [_req(temperature=0.0, presence_penalty=0.0001)]
    assert Sampler(V)(logits, greedy)[0] == [5, 0, 0]  # the all-greedy path
    assert Sampler(V)(logits[:1], penalized)[0] == [5]  # the general path


@pytest.mark.parametrize("v", [49152, 1000, 7])
def test_greedy_tokens_are_torchs_argmax_on_large_rows(v):
    """Greedy tokens in float32 come from the engine's one-pass kernel where it is built: the same index as
    torch.argmax on every row, the first of equal maxima (in one vector lane, across lanes, chains and the tail),
    the first NaN where a row has one, and rows of -inf."""
    g = torch.Generator().manual_seed(v)
    x = torch.randn(9, v, generator=g)
    x[1, [3, v - 1]] = 40.0  # a tie, first and tail
    x[2, [v // 2, min(v // 2 + 16, v - 2), v // 3]] = 40.0  # ties within a lane and across lanes
    x[3] = 1.0
    x[4, v - 1] = float("nan")
    x[5, [v // 4, v // 2]] = float("nan")
    x[6] = float("-inf")
    x[7, 0] = float("inf")
    x[8, [min(20, v - 1), min(67, v - 1)]] = 40.0  # a tie between the kernel's chains: the later chain's is first
    toks, _ = Sampler(v)(x, [_req(temperature=0.0) for _ in range(9)])
    assert toks == x.argmax(-1).tolist()


def test_padded_vocab_columns_are_never_chosen():
    logits = torch.cat([_logits(64), torch.full((64, 8), 100.0)], dim=1)  # lm_head padded to V + 8
    toks = Sampler(V)(logits, [_req(temperature=0.0)] + [_req() for _ in range(63)])[0]
    assert toks[0] == logits[0, :V].argmax() and all(0 <= t < V for t in toks)  # greedy and sampled rows alike


def test_greedy_rows_unaffected_by_sampled_rows():
    logits = _logits(4)
    reqs = [_req(temperature=0.0), _req(temperature=1.5, top_p=0.3), _req(temperature=0.0, top_k=3), _req()]
    toks, _ = Sampler(V, seed=1)(logits, reqs)
    assert toks[0] == logits[0].argmax() and toks[2] == logits[2].argmax()


def test_top_k_one_is_greedy():
    logits = _logits(8)
    toks, _ = Sampler(V, seed=3)(logits, [_req(temperature=2.0, top_k=1) for _ in range(8)])
    assert toks == logits.argmax(-1).tolist()


def _seeded_run(seed: int, batch: int, row: int, steps: int = 20) -> list[int]:
    """Tokens of a seeded request over `steps` steps, at `row` of a batch of mixed neighbours."""
    sampler = Sampler(V, seed=123)
    target = _req(seed=seed, temperature=0.9, top_p=0.95, top_k=20)
    others = [_req(), _req(temperature=0.0), _req(seed=7, min_p=0.1), _req(top_p=0.5, repetition_penalty=1.3),
              _req(logprobs=2), _req(seed=8), _req(temperature=1.7, presence_penalty=0.5)]
    reqs = others[: batch - 1]
    reqs.insert(row, target)
    out = []
    for step in range(steps):
        logits = _logits(batch, seed=1000 + step)
        logits[row] = _logits(1, seed=step)[0]  # the target's logits depend only on the step
        toks, _ = sampler(logits, reqs)
        out.append(toks[row])
        for r, t in zip(reqs, toks, strict=True):
            r.output_ids.append(t)
    return out


def test_seed_reproducible_and_independent_of_batch():
    alone = _seeded_run(42, batch=1, row=0)
    assert _seeded_run(42, batch=1, row=0) == alone
    assert _seeded_run(42, batch=8, row=5) == alone
    assert _seeded_run(42, batch=8, row=0) == alone
    assert _seeded_run(43, batch=8, row=5) != alone


def test_seeded_generator_lives_on_the_request():
    r = _req(seed=5)
    Sampler(V)(_logits(1), [r])
    assert isinstance(r.generator, torch.Generator)


@pytest.mark.parametrize(("kw", "allowed"), [
    ({"top_p": 0.5}, {0, 1}),  # 0.4 < 0.5, 0.4 + 0.3 reaches it
    ({"top_p": 0.75}, {0, 1, 2}),
    ({"top_p": 0.1}, {0}),  # the top token always stays
    ({"top_k": 2}, {0, 1}),
    ({"top_k": 3, "top_p": 0.6}, {0, 1}),  # top-p over the top-k renormalized: 0.4/0.9 < 0.6
    ({"min_p": 0.5}, {0, 1}),  # p >= 0.5 * 0.4
    ({"min_p": 0.3}, {0, 1, 2}),  # 0.1 < 0.12 <= 0.2
])
def test_filters_allow_exactly_the_expected_set(kw, allowed):
    counts = _draw([0.4, 0.3, 0.2, 0.1], 4000, **kw)
    assert set(torch.nonzero(counts).flatten().tolist()) == allowed


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson chi-square below the 99.9% quantile (Wilson-Hilferty approximation)."""
    n = counts.sum().item()
    expected = probs * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    k = len(probs) - 1
    z = 3.09  # 99.9%
    limit = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    return chi2 < limit


def test_frequencies_match_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    counts = _draw(torch.softmax(logits, -1).tolist(), 20000)
    assert _chi2_ok(counts, torch.softmax(logits, -1))


def test_temperature_scales_logits():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    probs = torch.softmax(logits, -1).tolist()
    for t in (0.5, 2.0):
        counts = _draw(probs, 20000, temperature=t)
        assert _chi2_ok(counts, torch.softmax(logits / t, -1))
    assert not _chi2_ok(_draw(probs, 20000, temperature=2.0), torch.softmax(logits, -1))


def test_seeded_frequencies_match_softmax():
    # One seeded request over many steps: its own generator's draws must be as random as the shared one.
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    sampler, r = Sampler(4), _req(seed=9)
    counts = torch.bincount(torch.tensor([sampler(logits, [r])[0][0] for _ in range(4000)]), minlength=4)
    assert _chi2_ok(counts, torch.softmax(logits[0], -1))


def _processed(logits: torch.Tensor, req: Request) -> torch.Tensor:
    """Log-softmax of the logits after penalties, read back from logprobs=V (log-softmax is logits minus a constant)."""
    req.params.logprobs = len(logits)
    req.params.temperature = 0.0
    _, (entry,) = Sampler(len(logits))(logits.unsqueeze(0), [req])
    out = torch.full_like(logits, float("nan"))
    for tok, lp in entry.top:
        out[tok] = lp
    return out


def test_repetition_penalty_formula():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5, 3.0])
    got = _processed(logits, _req(prompt=[0, 1], output=[1, 2], repetition_penalty=2.0))
    # Seen tokens 0, 1, 2: positive logits divided, negative multiplied; unseen unchanged.
    want = torch.tensor([1.0, -4.0, 0.5, -1.0, 0.5, 3.0])
    torch.testing.assert_close(got, want.log_softmax(-1))


def test_presence_and_frequency_penalties_formula():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5, 3.0])
    # Prompt tokens do not count for OpenAI penalties; token 1 twice and token 3 once in the output.
    got = _processed(logits, _req(prompt=[0, 5], output=[1, 3, 1], presence_penalty=0.5, frequency_penalty=0.25))
    want = logits - torch.tensor([0.0, 0.5 + 2 * 0.25, 0.0, 0.5 + 0.25, 0.0, 0.0])
    torch.testing.assert_close(got, want.log_softmax(-1))


def test_penalties_only_touch_their_rows():
    logits = _logits(3)
    reqs = [_req(output=[0, 1], temperature=0.0, logprobs=5),
            _req(output=[0, 1], temperature=0.0, logprobs=5, repetition_penalty=1.5, frequency_penalty=1.0),
            _req(output=[0, 1], temperature=0.0, logprobs=5)]
    _, lps = Sampler(V)(logits, reqs)
    for i in (0, 2):
        top = logits[i].log_softmax(-1).topk(5)
        assert [t for t, _ in lps[i].top] == top.indices.tolist()


def test_penalty_can_change_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]])
    assert Sampler(4)(logits, [_req(output=[0], temperature=0.0, presence_penalty=1.0)])[0] == [1]
    assert Sampler(4)(logits, [_req(prompt=[0], temperature=0.0, repetition_penalty=1.2)])[0] == [1]


def test_logprobs_entries():
    logits = _logits(3)
    reqs = [_req(logprobs=0), _req(logprobs=5, temperature=0.7), _req(temperature=0.0)]
    toks, lps = Sampler(V, seed=0)(logits, reqs)
    assert lps[2] is None
    ref = logits.log_softmax(-1)  # before temperature: the model's distribution
    for i in (0, 1):
        assert lps[i].token_id == toks[i]
        assert lps[i].logprob == pytest.approx(ref[i, toks[i]].item(), abs=1e-5)
    assert lps[0].top == []
    top = lps[1].top
    assert [t for t, _ in top] == ref[1].topk(5).indices.tolist()
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert top[0][1] == pytest.approx(ref[1].max().item(), abs=1e-5)


def test_does_not_modify_input_logits():
    logits = _logits(2)
    before = logits.clone()
    Sampler(V)(logits, [_req(output=[1], repetition_penalty=2.0, top_p=0.5, temperature=0.5), _req(top_k=3)])
    assert torch.equal(logits, before)


def test_different_unseeded_draws_differ():
    logits = torch.zeros(1, V)
    sampler = Sampler(V)
    assert len({sampler(logits, [_req()])[0][0] for _ in range(20)}) > 1


def _reference_mask(logits: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """Kept tokens by the textbook recipe: full sort, top-k, renormalize, smallest prefix reaching p."""
    order = logits.argsort(descending=True)
    probs = torch.softmax(logits[order][: k or None].double(), -1)
    n = int(((probs.cumsum(-1) - probs) < p).sum()) if p < 1 else len(probs)
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep[order[:n]] = True
    return keep


@pytest.mark.parametrize("scale", [8.0, 0.5])  # peaked: decided in the top 256; flat: falls back to a full sort
def test_top_k_top_p_match_full_sort_reference(scale):
    v = 1000
    logits = torch.randn(6, v, generator=torch.Generator().manual_seed(1)) * scale
    ks, ps = [0, 5, 300, 0, 700, 40], [0.9, 1.0, 0.8, 0.3, 0.99, 0.5]
    x = logits.clone()
    _top_k_top_p(x, ks, ps, torch.device("cpu"))
    for i in range(6):
        assert torch.equal(x[i].isfinite(), _reference_mask(logits[i], ks[i], ps[i])), (i, ks[i], ps[i])
        torch.testing.assert_close(x[i][x[i].isfinite()], logits[i][x[i].isfinite()])


def test_rows_with_filters_off_are_untouched():
    x = _logits(3)
    before = x.clone()
    _top_k_top_p(x, [0, 4, 0], [1.0, 1.0, 1.0], torch.device("cpu"))
    assert torch.equal(x[0], before[0]) and torch.equal(x[2], before[2]) and x[1].isfinite().sum() == 4


def test_frequencies_match_softmax_over_a_larger_vocab():
    # V spans several 256-token CDF blocks plus a padded partial one.
    v = 600
    logits = torch.randn(v, generator=torch.Generator().manual_seed(2))
    sampler = Sampler(v, seed=0)
    counts = torch.zeros(v, dtype=torch.long)
    for _ in range(6):
        toks, _ = sampler(logits.expand(6000, -1).contiguous(), [_req() for _ in range(6000)])
        counts += torch.bincount(torch.tensor(toks), minlength=v)
    assert _chi2_ok(counts, torch.softmax(logits, -1))


def test_zero_probability_tokens_never_chosen():
    v = 700
    allowed = [0, 255, 256, 511, 699]  # block edges and the last token of the padded block
    logits = torch.full((v,), float("-inf"))
    logits[allowed] = torch.tensor([0.0, -5.0, 1.0, -8.0, -3.0])
    toks, _ = Sampler(v, seed=0)(logits.expand(5000, -1).contiguous(), [_req() for _ in range(5000)])
    assert set(toks) <= set(allowed) and len(set(toks)) >= 4


def test_min_tokens_bans_eos_and_stop_token_ids_until_reached():
    logits = torch.full((1, 4), -5.0)
    logits[0, 2], logits[0, 3], logits[0, 1] = 9.0, 8.0, 1.0  # EOS (2) best, then stop id 3, then 1
    sampler = Sampler(4, eos_ids=(2,))
    early = _req(output=[0], temperature=0.0, min_tokens=2, stop_token_ids=[3])
    assert sampler(logits, [early])[0] == [1]
    assert sampler(logits, [_req(output=[0, 0], temperature=0.0, min_tokens=2)])[0] == [2]  # reached
    ignore = _req(output=[0], temperature=0.0, min_tokens=2, ignore_eos=True)
    assert sampler(logits, [ignore])[0] == [2]  # ignore_eos: EOS is an ordinary token, not banned
    for tok in sampler(logits.expand(64, -1).contiguous(), [_req(output=[0], min_tokens=2) for _ in range(64)])[0]:
        assert tok != 2  # sampled rows too
