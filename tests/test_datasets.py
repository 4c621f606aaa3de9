"""Dataset preprocessing follows the stated rules (DistServe's for ShareGPT and HumanEval)."""

from __future__ import annotations

import pytest

from bench import sharegpt
from bench.datasets import (
    is_synthetic,
    load_dataset,
    read_humaneval,
    sample_fixed,
    sample_humaneval,
    sample_longbench_synthetic,
    tokenizer_id,
)
from bench.sharegpt import keep_pair, load_conversations, make_pair, parse_truncated_array, sample_sharegpt


class CharTokenizer:
    """One token per character: lengths are obvious by eye. Counts encode calls to observe the cache."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


def test_truncated_array_keeps_whole_elements_only() -> None:
    text = '[\n {"id": 1, "x": [1, 2]},\n {"id": 2},\n {"id": 3, "conversations": [{"from": "hu'
    assert parse_truncated_array(text) == [{"id": 1, "x": [1, 2]}, {"id": 2}]
    assert parse_truncated_array('[{"a": 1}, {"b": 2}]') == [{"a": 1}, {"b": 2}]
    assert parse_truncated_array("[]") == []


def test_pairs_need_three_turns_and_join_a_random_prefix_with_newlines() -> None:
    assert make_pair(["a", "b"], 0) is None
    turns = ["t0", "t1", "t2", "t3", "t4"]
    ks = set()
    for idx in range(200):
        prompt, completion = make_pair(turns, idx)
        k = turns.index(completion)
        assert 1 <= k <= len(turns) - 1
        assert prompt == "\n".join(turns[:k])
        assert make_pair(turns, idx) == (prompt, completion)  # fixed per conversation
        ks.add(k)
    assert ks == {1, 2, 3, 4}  # every prefix length occurs


def test_length_filters() -> None:
    assert not keep_pair(3, 3, 2048)  # both < 4
    assert keep_pair(3, 4, 2048) and keep_pair(4, 3, 2048) and keep_pair(4, 1, 2048)
    assert not keep_pair(10, 0, 2048)  # nothing to generate
    assert keep_pair(2000, 47, 2048) and not keep_pair(2000, 48, 2048)  # total >= 2048 dropped
    assert keep_pair(1000, 24, 1024) and not keep_pair(1000, 25, 1024)  # the model's context
    assert not keep_pair(2000, 48, 4096)  # DistServe's 2048 rule holds for longer contexts too


def _fake_conversations() -> list[list[str]]:
    convs = []
    for i in range(300):
        n = i % 6  # 0..5 turns: a third have fewer than 3
        convs.append([f"turn{j} of conv {i} " + "x" * ((i * 37 + j * 101) % 900) for j in range(n)])
    convs[3] = ["ab", "c", "d"]  # every pair has both lengths < 4 -> never chosen
    return convs


def test_sharegpt_sample_obeys_rules_and_uses_the_cache(tmp_path) -> None:
    convs = _fake_conversations()
    tok = CharTokenizer()
    specs = sample_sharegpt(tok, 40, seed=5, max_model_len=1024, cache_dir=tmp_path, conversations=convs)
    assert len(specs) == 40
    valid = {}
    for i, turns in enumerate(convs):
        pair = make_pair(turns, i)
        if pair and keep_pair(len(pair[0]), len(pair[1]), 1024):
            valid[pair[0]] = len(pair[1])
    assert len({s.prompt_text for s in specs}) == 40  # without replacement
    for s in specs:
        assert valid[s.prompt_text] == s.output_len
        assert s.prompt_ids == tok.encode(s.prompt_text) and s.prompt_len == len(s.prompt_text)
        assert s.prompt_len + s.output_len <= 1024
    assert len(list(tmp_path.iterdir())) == 1
    # Same seed: same sample, and nothing is tokenized again.
    tok2 = CharTokenizer()
    again = sample_sharegpt(tok2, 40, seed=5, max_model_len=1024, cache_dir=tmp_path, conversations=convs)
    assert [s.prompt_text for s in again] == [s.prompt_text for s in specs]
    assert tok2.calls == 1  # only the probe for the cache key: lengths and prompt ids come from the cache
    assert [s.prompt_ids for s in again] == [s.prompt_ids for s in specs]
    other = sample_sharegpt(CharTokenizer(), 40, seed=6, max_model_len=1024, cache_dir=tmp_path, conversations=convs)
    assert [s.prompt_text for s in other] != [s.prompt_text for s in specs]


def test_sharegpt_samples_with_replacement_only_past_the_pool(tmp_path) -> None:
    convs = _fake_conversations()
    n_valid = sum(1 for i, t in enumerate(convs) if (p := make_pair(t, i)) and keep_pair(len(p[0]), len(p[1]), 2048))
    specs = sample_sharegpt(CharTokenizer(), n_valid + 10, 0, 2048, tmp_path, convs)
    assert len(specs) == n_valid + 10 and len({s.prompt_text for s in specs}) == n_valid


def test_tokenizer_identity_separates_vocabularies() -> None:
    class Other(CharTokenizer):
        def encode(self, text: str) -> list[int]:
            return [ord(c) + 1 for c in text]

    assert tokenizer_id(CharTokenizer()) == tokenizer_id(CharTokenizer())
    assert tokenizer_id(CharTokenizer()) != tokenizer_id(Other())


def test_longbench_synthetic_lengths_and_label() -> None:
    texts = [f"paragraph {i}: " + "lorem ipsum " * (i % 50 + 1) for i in range(100)]
    tok = CharTokenizer()
    specs = sample_longbench_synthetic(tok, 50, seed=1, max_model_len=4096, texts=texts)
    for s in specs:
        assert 1900 <= s.prompt_len <= 2048 and 61 <= s.output_len <= 121
        assert s.prompt_ids == tok.encode(s.prompt_text) and s.prompt_text.startswith("Summarize")
    capped = sample_longbench_synthetic(tok, 50, seed=1, max_model_len=2048, texts=texts)
    assert all(s.prompt_len + s.output_len <= 2048 for s in capped)
    assert is_synthetic("longbench-synthetic") and not is_synthetic("sharegpt")


def test_fixed_lengths_and_cap() -> None:
    tok = CharTokenizer()
    specs = load_dataset("fixed:100:20", tok, 5, seed=0)
    assert [(s.prompt_len, s.output_len, len(s.prompt_ids)) for s in specs] == [(100, 20, 100)] * 5
    assert len({tuple(s.prompt_ids[:16]) for s in specs}) > 1  # prompts do not share a prefix
    assert sample_fixed(tok, 1, 0, 3000, 48, max_model_len=2048)[0].prompt_len == 2000
    for bad in ("fixed:10", "fixed:0:5", "nope"):
        with pytest.raises(ValueError):
            load_dataset(bad, tok, 1)


def test_humaneval_real_file() -> None:
    problems = read_humaneval()
    assert len(problems) == 164
    tok = CharTokenizer()
    specs = sample_humaneval(tok, 164, seed=0, problems=problems)
    by_prompt = {p["prompt"]: len(p["canonical_solution"]) for p in problems}
    assert sorted(s.prompt_text for s in specs) == sorted(by_prompt)  # each problem once
    assert all(s.output_len == by_prompt[s.prompt_text] for s in specs)
    assert len(sample_humaneval(tok, 200, seed=0, problems=problems)) == 200


def test_sharegpt_real_file(tmp_path) -> None:
    convs = load_conversations()
    assert len(convs) == 17_671  # whole conversations before the 125 MB cut
    assert convs[0][0].startswith("Summarize the main ideas of Jeff Walker's Product Launch Formula")
    assert sharegpt.sharegpt_path().stat().st_size > 100e6
    specs = sample_sharegpt(CharTokenizer(), 20, seed=0, max_model_len=2048, cache_dir=tmp_path)
    assert len(specs) == 20 and all(keep_pair(s.prompt_len, s.output_len, 2048) for s in specs)


def test_fixed_text_prompts_have_the_requested_length_under_the_real_tokenizer() -> None:
    from engine.loader import load_tokenizer

    tok = load_tokenizer()  # the bundled model's (metadata only: no weights)
    for n in (1, 7, 64, 300):
        for s in load_dataset(f"fixed:{n}:4", tok, 6, seed=n):
            assert len(tok.encode(s.prompt_text)) == n == s.prompt_len  # what a text-only server counts
            assert s.prompt_ids == tok.encode(s.prompt_text)
