"""Batched sampling: penalties, temperature, top-k / top-p / min-p, per-request seeds, logprobs.

One pass of tensor ops for the whole batch; work that only some rows need (penalties, top-k/top-p,
logprobs) runs on just those rows, and rows with a filter off are left bit-for-bit unchanged. Top-k/top-p
look at each row's top 256 logits; only a row whose nucleus is wider than that sorts the whole vocab.

Order, per row (HF/vLLM): min_tokens (stop tokens banned until then) -> repetition penalty ->
presence/frequency penalties -> [logprobs taken here] -> greedy argmax, or temperature -> top-k -> top-p
-> min-p -> sample.

Logprobs are the log-softmax of the logits after penalties and before temperature and the filters:
the model's distribution as the penalties left it, never flattened or truncated by the sampling knobs.

Unseeded rows sample by inverse CDF with one uniform each from the Sampler's generator. Seeded rows use
the exponential race, argmax(p / E) with E ~ Exponential(1) i.i.d., drawing their V exponentials from
their own generator, so their tokens depend only on their seed and logits, not on the batch around them.
"""
from __future__ import annotations

import itertools

import torch

from engine import kernels
from engine.request import Request
from engine.step import TokenLogprobs

_NEG_INF = float("-inf")


class Sampler:
    def __init__(self, vocab_size: int, device: str | torch.device = "cpu", seed: int | None = None,
                 eos_ids: tuple[int, ...] | list[int] = ()) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.eos_ids = frozenset(eos_ids)  # banned with stop_token_ids while a request is under min_tokens
        self.generator = torch.Generator(device=self.device)  # for rows without a seed
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: [B, V'] with V' >= vocab_size (extra padded columns are ignored), one row per request."""
        assert logits.dim() == 2 and logits.shape[0] == len(reqs), (tuple(logits.shape), len(reqs))
        logits = logits[:, : self.vocab_size]
        ps = [r.params for r in reqs]
        penalized = [i for i, p in enumerate(ps) if _has_penalty(p)]
        want_lp = [i for i, p in enumerate(ps) if p.logprobs is not None]
        sampled = [i for i, p in enumerate(ps) if not p.greedy]
        too_short = [i for i, r in enumerate(reqs) if len(r.output_ids) < r.params.min_tokens]
        if not penalized and not want_lp and not sampled and not too_short:
            # All greedy: just argmax (in float32: CPU argmax over bf16 is ~8x slower than converting first).
            return _argmax(logits.float()).tolist(), [None] * len(reqs)

        x = logits.to(torch.float32, copy=True)  # [B, V]; a copy because everything below is in place
        for i in too_short:
            banned = [t for t in self._stop_ids(reqs[i].params) if t < x.shape[1]]
            x[i, banned] = _NEG_INF
        if penalized:
            _apply_penalties(x, [reqs[i] for i in penalized], penalized)
        if not sampled:
            tokens = _argmax(x)  # [B]
        else:
            tokens = torch.empty(len(reqs), dtype=torch.long, device=self.device)
            if len(sampled) < len(reqs):
                greedy = self._index([i for i, p in enumerate(ps) if p.greedy])
                tokens[greedy] = _argmax(x[greedy])
        lp_rows = None
        if want_lp:
            lp_rows = torch.log_softmax(x[self._index(want_lp)], dim=-1)  # [L, V], before temperature
        if sampled:
            rows = self._index(sampled)
            xs = x if len(sampled) == len(reqs) else x[rows]  # [S, V]
            tokens[rows] = self._sample(xs, [reqs[i] for i in sampled])

        token_list = tokens.tolist()
        entries: list[TokenLogprobs | None] = [None] * len(reqs)
        if lp_rows is not None:
            chosen = lp_rows.gather(1, tokens[self._index(want_lp)].unsqueeze(1)).squeeze(1).tolist()
            n_top = min(max(ps[i].logprobs for i in want_lp), x.shape[1])
            top_v, top_i = lp_rows.topk(n_top, dim=-1) if n_top else (lp_rows[:, :0], lp_rows[:, :0].long())
            top_v, top_i = top_v.tolist(), top_i.tolist()
            for j, i in enumerate(want_lp):
                n = ps[i].logprobs
                entries[i] = TokenLogprobs(token_list[i], chosen[j], list(zip(top_i[j][:n], top_v[j][:n], strict=True)))
        return token_list, entries

    def _stop_ids(self, p) -> set[int]:
        return set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)

    def _index(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _sample(self, x: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """x: [S, V] float32 penalized logits of the non-greedy rows (modified in place). Returns [S] token ids."""
        ps = [r.params for r in reqs]
        if any(p.temperature != 1.0 for p in ps):
            x.div_(torch.tensor([p.temperature for p in ps], device=self.device).unsqueeze(1))
        _top_k_top_p(x, [p.top_k for p in ps], [p.top_p for p in ps], self.device)
        probs = torch.softmax(x, dim=-1)  # [S, V]; zero where filtered
        min_p = [p.min_p for p in ps]
        if any(m > 0.0 for m in min_p):
            # Relative to the top token's probability, so it commutes with top-k/top-p renormalization.
            thresh = probs.amax(dim=-1, keepdim=True) * torch.tensor(min_p, device=self.device).unsqueeze(1)
            probs.masked_fill_(probs < thresh, 0.0)
        out = torch.empty(len(reqs), dtype=torch.long, device=self.device)
        seeded = [i for i, r in enumerate(reqs) if r.params.seed is not None]
        free = [i for i, r in enumerate(reqs) if r.params.seed is None]
        if free:
            rows = slice(None) if not seeded else self._index(free)
            out[rows] = _inverse_cdf(probs[rows], self.generator)
        if seeded:
            rows = slice(None) if not free else self._index(seeded)
            out[rows] = _exponential_race(probs[rows], [reqs[i] for i in seeded])
        return out


_CDF_BLOCK = 256  # tokens per block of the two-level inverse CDF


def _inverse_cdf(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """probs: [U, V] -> [U] samples with one uniform per row (drawing V per row costs more than all the rest).

    Two levels so that float32 prefix sums stay exact enough for tail tokens (a float32 cumsum over
    the whole vocab would round away every p below ~3e-8 once the sum nears 1, and a float64 one is
    ~20x slower on CPU): cumsum within blocks of 256 in float32, then across block masses in float64.
    The chosen token is the first whose prefix sum exceeds the target, so it always has p > 0.
    """
    n, v = probs.shape
    nb = -(-v // _CDF_BLOCK)
    if nb * _CDF_BLOCK != v:
        probs = torch.nn.functional.pad(probs, (0, nb * _CDF_BLOCK - v))
    cum_in = probs.reshape(n, nb, _CDF_BLOCK).cumsum(dim=-1)  # [n, nb, 256] within each block
    mass = cum_in[:, :, -1].double()  # [n, nb]
    cum_b = mass.cumsum(dim=-1)  # [n, nb]
    total = cum_b[:, -1:]
    u = torch.rand((n, 1), dtype=torch.float64, device=probs.device, generator=generator)
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # < total, even rounded
    block = torch.searchsorted(cum_b, target, right=True)  # [n, 1], first block whose prefix exceeds target
    before = torch.where(block > 0, cum_b.gather(1, (block - 1).clamp(min=0)), 0.0)
    blk_mass = mass.gather(1, block)
    rest = torch.minimum(target - before, torch.nextafter(blk_mass, torch.zeros_like(blk_mass)))  # < block mass
    inner = cum_in[torch.arange(n, device=probs.device), block.squeeze(1)].double()  # [n, 256]
    return block.squeeze(1) * _CDF_BLOCK + torch.searchsorted(inner, rest, right=True).squeeze(1)


def _exponential_race(probs: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """probs: [R, V] of seeded rows -> [R] samples, argmax(p / E) with E ~ Exponential(1) from each row's generator.

    Each row draws exactly V uniforms per step and everything else is elementwise, so a row's tokens do not
    depend on the batch around it. E = -log(U), U in [0, 1): U = 0 gives E = inf and p / E = 0, never NaN.
    """
    q = torch.empty_like(probs)
    for i, r in enumerate(reqs):
        q[i].uniform_(generator=_generator(r, probs.device))  # a view: fills row i in place
    return _argmax(probs.div_(q.log_().neg_()))


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B]: the first index of each row's maximum (of its first NaN where it has one), as torch.argmax
    gives it. On CPU float32 the engine's one-pass kernel (engine/cpu_kernels.cpp argmax_rows; in a batch-32
    float32 step torch.max took ~1.2 ms); else torch.max's reduction, ~2.7x faster than torch.argmax here (32 x
    49,152 float32, 2 threads: 0.44 vs 1.17 ms; 1 row: 27 vs 72 us)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] and kernels.load():
        return torch.ops.distserve.argmax_rows(x)
    return x.max(dim=-1).indices


def _has_penalty(p) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _generator(req: Request, device: torch.device) -> torch.Generator:
    """The request's own generator, seeded on first use; it then advances with every sampled step."""
    if req.generator is None:
        req.generator = torch.Generator(device=device)
        req.generator.manual_seed(req.params.seed)
    return req.generator


def _apply_penalties(x: torch.Tensor, reqs: list[Request], rows: list[int]) -> None:
    """In place on x [B, V], touching only the (row, token) entries the requests have seen.

    Repetition (HF/vLLM): over prompt+output tokens, a positive logit is divided by the penalty and a
    negative one multiplied, so the token always becomes less likely for penalty > 1.
    Presence/frequency (OpenAI): over output tokens, logit -= frequency * count + presence * (count > 0).
    Gather/scatter over the token lists rather than [B, V] masks: a few thousand entries, not B x V.
    Repeated ids write the same value twice, which is what makes presence count once.
    """
    dev = x.device
    if any(r.params.repetition_penalty != 1.0 for r in reqs):
        row, ids = _flat(reqs, rows, lambda r: r.prompt_ids + r.output_ids, dev)
        pen = torch.tensor([r.params.repetition_penalty for r in reqs], device=dev)[row[1]]
        vals = x[row[0], ids]
        x[row[0], ids] = torch.where(vals > 0, vals / pen, vals * pen)
    if any(r.params.presence_penalty or r.params.frequency_penalty for r in reqs):
        row, ids = _flat(reqs, rows, lambda r: r.output_ids, dev)
        pres = torch.tensor([r.params.presence_penalty for r in reqs], device=dev)[row[1]]
        freq = torch.tensor([r.params.frequency_penalty for r in reqs], device=dev)[row[1]]
        x[row[0], ids] = x[row[0], ids] - pres
        x.index_put_((row[0], ids), -freq, accumulate=True)  # once per occurrence: count * frequency


def _flat(reqs: list[Request], rows: list[int], ids_of, device: torch.device):
    """Each request's token ids in one flat tensor [T], with their batch row and their index in reqs (2 x [T])."""
    lists = [ids_of(r) for r in reqs]
    ids = torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=torch.long, device=device)
    lens = torch.tensor([len(t) for t in lists], device=device)
    local = torch.repeat_interleave(torch.arange(len(reqs), device=device), lens)
    return (torch.tensor(rows, device=device)[local], local), ids


def _top_k_top_p(x: torch.Tensor, ks: list[int], ps: list[float], device: torch.device) -> None:
    """Top-k, then top-p over what top-k kept; in place on x [S, V]. Rows with both off are not touched.

    Both come down to a per-row threshold logit (ties at it are kept). It is found among each row's top
    _FIRST_K logits, which is all a peaked LM distribution needs; only rows whose nucleus is wider pay for
    a full sort of the vocab.
    """
    v = x.shape[1]
    rows = [i for i in range(len(ks)) if 0 < ks[i] < v or ps[i] < 1.0]
    if not rows:
        return
    idx = torch.tensor(rows, device=device)
    k = torch.tensor([ks[i] if 0 < ks[i] < v else v for i in rows], device=device)  # [R]; v: off
    p = torch.tensor([ps[i] for i in rows], device=device)  # [R]; 1.0: off
    xr = x if len(rows) == len(ks) else x[idx]  # [R, V]
    first_k = min(v, max(_FIRST_K, int(k.masked_fill(k == v, 0).max())))
    thresh, decided = _threshold(xr, k, p, first_k)
    if not decided.all():
        wide = (~decided).nonzero().squeeze(1)
        thresh[wide] = _threshold(xr[wide], k[wide], p[wide], v)[0]
    if xr is x:
        x.masked_fill_(x < thresh, _NEG_INF)
    else:
        x[idx] = xr.masked_fill(xr < thresh, _NEG_INF)


_FIRST_K = 256  # candidates examined before falling back to a full sort


def _threshold(xr: torch.Tensor, k: torch.Tensor, p: torch.Tensor, first_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row threshold logit [R, 1] from the top first_k logits, and [R] whether first_k was enough."""
    v = xr.shape[1]
    vals = xr.topk(first_k, dim=-1).values  # [R, first_k], descending
    kth = vals.gather(1, (k.clamp(max=first_k) - 1).unsqueeze(1))  # [R, 1]
    kth = kth.masked_fill((k == v).unsqueeze(1), _NEG_INF)
    in_k = vals >= kth  # [R, first_k]
    # Top-p renormalizes over the top-k set; without top-k over the whole row (not just first_k).
    lse = torch.where(k < v, vals.masked_fill(~in_k, _NEG_INF).logsumexp(-1), xr.logsumexp(-1))
    probs = (vals - lse.unsqueeze(1)).exp().masked_fill(~in_k, 0.0)
    cum = probs.cumsum(dim=-1)
    # Keep a token while the strictly more likely ones hold less than p; p = 1 keeps all (cumsum can round up).
    keep = in_k & ((cum - probs < p.unsqueeze(1)) | (p >= 1.0).unsqueeze(1))
    thresh = vals.gather(1, (keep.sum(-1) - 1).unsqueeze(1))
    decided = (k <= first_k) | (cum[:, -1] >= p) | (first_k == v)
    return thresh, decided
