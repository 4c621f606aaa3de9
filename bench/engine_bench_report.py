"""Turns the engine bench's raw worker results into rows (metric, ours, transformers, ratio, target,
met?), machine-relative figures (MFU, fraction of the bandwidth limit), and text or markdown tables."""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from engine.config import ModelConfig

# Issue targets: ours / transformers (memory: ours / transformers at most).
PREFILL_TARGET = 1.1
DECODE_TARGETS = {1: 1.6, 32: 2.5}
MEMORY_TARGET = 1.0


@dataclass
class Row:
    metric: str
    ours: float | None
    hf: float | None
    unit: str = ""
    target: float | None = None
    lower_is_better: bool = False
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.ours / self.hf if self.ours is not None and self.hf else None

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio <= self.target if self.lower_is_better else self.ratio >= self.target

    def as_dict(self) -> dict:
        return {"metric": self.metric, "ours": self.ours, "hf": self.hf, "unit": self.unit, "ratio": self.ratio,
                "target": self.target, "lower_is_better": self.lower_is_better, "met": self.met, "note": self.note}


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


def rows(cfg: ModelConfig, ours: dict, hf: dict, peaks: dict) -> list[Row]:
    out: list[Row] = []
    gib = 2**30
    for b, po in ours["prefill"].items():
        ph, n = hf["prefill"][b], po["tokens_in"] // int(b)
        flops = prefill_flops(cfg, int(b), n)
        out += [Row(f"prefill {b}x{n} tok/s (wall)", po["tok_s"], ph["tok_s"], "tok/s", PREFILL_TARGET),
                Row(f"prefill {b}x{n} tok/s (forward)", po["forward_tok_s"], ph["forward_tok_s"], "tok/s"),
                Row(f"prefill {b}x{n} MFU vs {peaks['dtype']} peak", flops / po["wall_s"] / peaks["matmul_flops"],
                    flops / ph["wall_s"] / peaks["matmul_flops"], "%"),
                Row(f"prefill {b}x{n} MFU vs bf16 peak", flops / po["wall_s"] / peaks["matmul_flops_bf16"],
                    flops / ph["wall_s"] / peaks["matmul_flops_bf16"], "%")]
    for b, do in ours["decode"].items():
        dh = hf["decode"][b]
        bw = peaks["copy_bandwidth"]
        lim = {"ours": bw / ours["weight_bytes"], "hf": bw / hf["weight_bytes"]}  # steps/s if only weights moved
        out += [Row(f"decode B={b} tok/s (wall)", do["tok_s"], dh["tok_s"], "tok/s", DECODE_TARGETS.get(int(b))),
                Row(f"decode B={b} tok/s (decode only)", do["decode_only_tok_s"], dh["decode_only_tok_s"], "tok/s"),
                Row(f"decode B={b} steps/s vs copy-bandwidth limit", do["steps_s"] / lim["ours"],
                    dh["steps_s"] / lim["hf"], "%"),
                Row(f"decode B={b} greedy sequences identical", _match(do["tokens"], dh["tokens"]), None, "%")]
    mo, mh = ours["memory"], hf["memory"]
    out += [Row("peak RSS while running", _gib(mo["peak_rss_run"]), _gib(mh["peak_rss_run"]), "GiB",
                MEMORY_TARGET, lower_is_better=True),
            Row("RSS after load", mo["rss_after_load"] / gib, mh["rss_after_load"] / gib, "GiB"),
            Row("peak RSS, whole process (ru_maxrss)", mo["lifetime_peak_rss"] / gib, mh["lifetime_peak_rss"] / gib,
                "GiB", note="includes checkpoint loading"),
            Row("weights read per decode step", ours["weight_bytes"] / gib, hf["weight_bytes"] / gib, "GiB")]
    return out


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
    target = "-" if r.target is None else ("<= " if r.lower_is_better else ">= ") + f"{r.target:g}x"
    met = {None: "", True: "yes", False: "NO"}[r.met]
    return [r.metric, _fmt(r.ours, r.unit), _fmt(r.hf, r.unit), ratio, target, met]


HEADER = ["metric", "ours", "transformers", "ratio", "target", "met?"]


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
