"""Turns the engine bench's raw worker results into rows (metric, ours, transformers, llama.cpp, ratios,
target, met?), machine-relative figures (MFU, fraction of the bandwidth limit), and text or markdown
tables."""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from engine.config import ModelConfig

# Issue 2 targets, ours / transformers (memory: at most); without llama.cpp in the run these apply.
PREFILL_TARGET = 1.1
DECODE_TARGETS = {1: 1.6, 32: 2.5}
MEMORY_TARGET = 1.0
# Issue 10 targets, ours / llama.cpp at the same precision ("best": the faster of llama.cpp and
# transformers), and decode at batch 1 as a share of the copy-bandwidth limit.
LLAMA_DECODE_TARGETS = {1: 1.0, 32: 1.5}
LLAMA_PREFILL_TARGET = 1.0  # bf16, against the faster of the two
BANDWIDTH_TARGET = 0.6


@dataclass
class Row:
    metric: str
    ours: float | None
    hf: float | None
    unit: str = ""
    target: float | None = None
    lower_is_better: bool = False
    note: str = ""
    llama: float | None = None
    target_vs: str = "hf"  # what the target ratio is taken against: hf, llama, best (the faster), self

    @property
    def ratio(self) -> float | None:
        return self.ours / self.hf if self.ours is not None and self.hf else None

    @property
    def ratio_llama(self) -> float | None:
        return self.ours / self.llama if self.ours is not None and self.llama else None

    @property
    def judged(self) -> float | None:
        """The ratio the target applies to."""
        if self.target_vs == "llama":
            return self.ratio_llama
        if self.target_vs == "best":
            refs = [r for r in (self.hf, self.llama) if r]
            return self.ours / max(refs) if refs and self.ours is not None else None
        if self.target_vs == "self":
            return self.ours
        return self.ratio

    @property
    def met(self) -> bool | None:
        if self.target is None or self.judged is None:
            return None
        return self.judged <= self.target if self.lower_is_better else self.judged >= self.target

    def as_dict(self) -> dict:
        return {"metric": self.metric, "ours": self.ours, "hf": self.hf, "llama": self.llama, "unit": self.unit,
                "ratio": self.ratio, "ratio_llama": self.ratio_llama, "target": self.target,
                "target_vs": self.target_vs, "lower_is_better": self.lower_is_better, "met": self.met,
                "note": self.note}


def median_tree(runs: list):
    """Median of every numeric leaf across repeats; other leaves from the first run."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: median_tree([r[k] for r in runs]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool) and all(r is not None for r in runs):
        return statistics.median(runs)
    return first


def linear_params(cfg: ModelConfig) -> int:
    """Matmul parameters one token passes through in the decoder layers (LM head excluded)."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    return cfg.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * f)


def prefill_flops(cfg: ModelConfig, batch: int, length: int) -> float:
    """2 * params * tokens for the layers, plus the LM head on each prompt's last token; attention
    score/value flops excluded."""
    return 2.0 * linear_params(cfg) * batch * length + 2.0 * batch * cfg.vocab_size * cfg.hidden_size


def best_peaks(samples: list[dict]) -> dict:
    """Machine figures measured before and after the systems: keep the best of each (a busy moment
    on a shared machine only ever lowers them)."""
    out = dict(samples[0])
    for s in samples[1:]:
        for k, v in s.items():
            if k.endswith(("flops", "bandwidth")) and v > out[k]:
                out[k] = v
                if k.startswith("matmul"):
                    n_key = "matmul_n" + k.removeprefix("matmul_flops")
                    out[n_key] = s[n_key]
    return out


def _match(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


def rows(cfg: ModelConfig, ours: dict, hf: dict | None, peaks: dict, llama: dict | None = None,
         precision: str | None = None) -> list[Row]:
    """With llama.cpp in the run, targets are issue 10's (against llama.cpp at the same precision; prefill
    against the faster of the two at bf16); without it, issue 2's (against transformers)."""
    out: list[Row] = []
    gib = 2**30
    hf = hf or {"prefill": {}, "decode": {}, "memory": None, "weight_bytes": None}
    ll = llama or {"prefill": {}, "decode": {}}
    get = lambda d, *ks: _dig(d, ks)  # noqa: E731
    for b, po in ours["prefill"].items():
        ph, n = hf["prefill"].get(b, {}), po["tokens_in"] // int(b)
        flops = prefill_flops(cfg, int(b), n)
        t_wall = PREFILL_TARGET if not llama else None
        t_fwd = LLAMA_PREFILL_TARGET if llama and precision == "bfloat16" and b == "1" else None
        mfu = lambda r, peak, flops=flops: flops / r["wall_s"] / peaks[peak] if r else None  # noqa: E731
        out += [Row(f"prefill {b}x{n} tok/s (wall)", po["tok_s"], ph.get("tok_s"), "tok/s", t_wall),
                Row(f"prefill {b}x{n} tok/s (forward)", po["forward_tok_s"], ph.get("forward_tok_s"), "tok/s", t_fwd,
                    llama=get(ll, "prefill", b, "forward_tok_s"), target_vs="best"),
                Row(f"prefill {b}x{n} MFU vs {peaks['dtype']} peak", mfu(po, "matmul_flops"), mfu(ph, "matmul_flops"),
                    "%"),
                Row(f"prefill {b}x{n} MFU vs bf16 peak", mfu(po, "matmul_flops_bf16"), mfu(ph, "matmul_flops_bf16"),
                    "%")]
    for b, do in ours["decode"].items():
        dh, dl = hf["decode"].get(b, {}), ll["decode"].get(b)
        frac = lambda d, r: _bw_fraction(d, r, peaks["copy_bandwidth"])  # noqa: E731
        t_dec = LLAMA_DECODE_TARGETS.get(int(b)) if llama else None
        out += [Row(f"decode B={b} tok/s (wall)", do["tok_s"], dh.get("tok_s"), "tok/s",
                    DECODE_TARGETS.get(int(b)) if not llama else None),
                Row(f"decode B={b} tok/s (decode only)", do["decode_only_tok_s"], dh.get("decode_only_tok_s"), "tok/s",
                    t_dec, llama=dl["decode_only_tok_s"] if dl else None, target_vs="llama"),
                Row(f"decode B={b} steps/s vs copy-bandwidth limit", frac(do, ours), frac(dh, hf), "%",
                    BANDWIDTH_TARGET if llama and b == "1" else None, llama=frac(dl, llama) if dl else None,
                    target_vs="self"),
                Row(f"decode B={b} greedy sequences identical", _match(do["tokens"], dh["tokens"]) if dh else None,
                    None, "%")]
    mo, mh = ours["memory"], hf.get("memory") or {}
    g = lambda m, k: _gib(m.get(k)) if m else None  # noqa: E731
    out += [Row("peak RSS while running", _gib(mo["peak_rss_run"]), g(mh, "peak_rss_run"), "GiB",
                MEMORY_TARGET if not llama else None, lower_is_better=True),
            Row("RSS after load", mo["rss_after_load"] / gib, g(mh, "rss_after_load"), "GiB"),
            Row("peak RSS, whole process (ru_maxrss)", mo["lifetime_peak_rss"] / gib, g(mh, "lifetime_peak_rss"),
                "GiB", note="includes checkpoint loading"),
            Row("weights read per decode step", ours["weight_bytes"] / gib,
                hf["weight_bytes"] / gib if hf.get("weight_bytes") else None, "GiB",
                llama=llama["weight_bytes"] / gib if llama else None)]
    if ours.get("compile_s") is not None:
        out.append(Row("compile (or cache load) of the decode steps", ours["compile_s"], None, "s"))
    return out


def _bw_fraction(d: dict | None, r: dict, copy_bandwidth: float) -> float | None:
    """Decode steps/s as a share of the limit copy_bandwidth / weight bytes (steps/s if only weights moved)."""
    if not d or not r.get("weight_bytes"):
        return None
    return d["steps_s"] / (copy_bandwidth / r["weight_bytes"])


def _dig(d: dict, keys: tuple):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _gib(x: int | None) -> float | None:
    return x / 2**30 if x is not None else None


def _fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "%":
        return f"{100 * x:.1f}%"
    return f"{x:,.3f}" if abs(x) < 10 else f"{x:,.1f}"


def _cells(r: Row) -> list[str]:
    ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
    ratio_l = f"{r.ratio_llama:.2f}x" if r.ratio_llama is not None else "-"
    vs = {"hf": "", "llama": " vs llama.cpp", "best": " vs the faster", "self": ""}[r.target_vs]
    target = "-" if r.target is None else ("<= " if r.lower_is_better else ">= ") + f"{r.target:g}" + (
        "" if r.target_vs == "self" else "x") + vs
    met = {None: "", True: "yes", False: "NO"}[r.met]
    return [r.metric, _fmt(r.ours, r.unit), _fmt(r.hf, r.unit), _fmt(r.llama, r.unit), ratio, ratio_l, target, met]


HEADER = ["metric", "ours", "transformers", "llama.cpp", "ours/tf", "ours/llama", "target", "met?"]


def machine_lines(peaks: dict) -> list[str]:
    g = 1e9
    return [f"matmul (F.linear) {peaks['matmul_n']}^3 {peaks['dtype']}: {peaks['matmul_flops'] / g:.1f} GFLOP/s; "
            f"{peaks['matmul_n_bf16']}^3 bf16: {peaks['matmul_flops_bf16'] / g:.1f} GFLOP/s",
            f"memory bandwidth: copy {peaks['copy_bandwidth'] / g:.1f} GB/s (read+write); "
            f"GEMV chain shaped like decode, {peaks['dtype']}: {peaks['gemv_bandwidth'] / g:.1f} GB/s (weights read)",
            "decode bandwidth limit = copy bandwidth / weight bytes per step; MFU = (2 x matmul params x tokens "
            "+ LM head on the last tokens) / wall / peak, attention flops excluded"]


def text_table(rs: list[Row]) -> str:
    cells = [HEADER] + [_cells(r) for r in rs]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    line = lambda c: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths)))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(c) for c in cells[1:]])


def markdown_table(rs: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(_cells(r)) + " |" for r in rs])
