"""The tokenizer rebuilt from the GGUF matches transformers' tokenizer for the same file."""
from __future__ import annotations

import os
import random

import jinja2
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local

from engine.loader import default_model_path, load_tokenizer  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402

BASE = [
    "", " ", "  ", "\t", "\n", "\n\n\n", " \n \t ", "Hello world", "Hello, world!", "  leading spaces", "trailing  ",
    "don't won't I'm we've they'll she'd it's", "DON'T YOU'RE", "multiple     spaces   here", "tabs\tand\tnewlines\n",
    "line1\r\nline2\rline3", "12345", "3.14159265", "1,000,000 and 1e-9", "2024-01-31T12:00:00Z", "0x1F 0b1010 007",
    "café naïve résumé façade", "Ünïcödé ßtraße", "日本語のテキストです。", "中文字符和标点，测试！", "한국어 텍스트",
    "Привет, мир", "مرحبا بالعالم", "שלום עולם", "ελληνικά", "हिन्दी", "ไทย", "😀", "👍🏽", "👨‍👩‍👧‍👦 family",
    "🇫🇷🇯🇵 flags", "emoji😀in😀text", "∑∫√∞≈≠", "→ ← ↑ ↓", "\u200b zero width", "\u00a0nbsp", "a\u0301 combining",
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }", "<div class=\"x\">&amp;</div>",
    "SELECT * FROM t WHERE id = 1;", "import numpy as np\nnp.zeros((3, 4))", "{\"key\": [1, 2, {\"a\": null}]}",
    "    indented\n        more\n\t\tmixed", "https://example.com/path?q=1&r=2#frag", "user@example.com",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>", "text<|im_end|>text",
    "<|im_start|><|im_start|>", "<repo_name>x<file_sep>", "< |im_start| >", "<|im_star", "¡¿!?", "~`@#$%^&*()_+-=",
    "A" * 200, "ab" * 100, " " * 50, "\n" * 20, "word " * 40,
]
POOL = list("abcXYZ019 \t\n.,;:'\"!?()[]{}<>-_=+*/\\|@#$%^&~`") + list("éüßøñ日本語中文한국😀👍🏽🎉∑→\u200b\u00a0")


def corpus() -> list[str]:
    """~300 strings: hand-picked cases plus seeded random mixes of the hard characters."""
    rng = random.Random(0)
    mixes = ["".join(rng.choice(POOL) for _ in range(rng.randint(1, 40))) for _ in range(160)]
    joins = [rng.choice(BASE) + rng.choice(["", " ", "\n"]) + rng.choice(BASE) for _ in range(80)]
    return BASE + mixes + joins


@pytest.fixture(scope="module")
def ref():
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def ref_json(ref):
    """transformers' GGUF loader does not know llama.cpp's "smollm" pre-tokenizer and falls back to
    plain ByteLevel. SmolLM2's own tokenizer.json (and llama.cpp) split every digit off first:
    this is the reference tokenizer with that pre-tokenizer put back."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    backend = Backend.from_str(ref.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return backend


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer()


def test_special_ids_and_vocab(tok: Tokenizer, ref) -> None:
    assert tok.vocab_size == 49152 == len(ref)
    assert (tok.bos_token_id, tok.eos_token_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 2)
    assert tok.id_to_token(2) == "<|im_end|>"
    assert tok.special_ids == set(range(17))  # the GGUF's control tokens, as in HF's tokenizer.json


def test_encode_matches_reference(tok: Tokenizer, ref, ref_json) -> None:
    texts = corpus()
    assert len(texts) >= 300
    mismatches = [t for t in texts if tok.encode(t) != ref_json.encode(t, add_special_tokens=False).ids]
    assert not mismatches, mismatches[:5]
    # Against transformers' GGUF tokenizer as is, only whitespace runs before a digit differ.
    differ = [t for t in texts if tok.encode(t) != ref.encode(t, add_special_tokens=False)]
    assert len(differ) < len(texts) // 20 and all(any(c.isdigit() for c in t) for t in differ), differ


def test_digits_split_like_llama_cpp_smollm(tok: Tokenizer, ref) -> None:
    """"\n\n1": the whitespace run stays whole ("\n\n" is one token), then the digit."""
    assert tok.encode("a\n\n1") == tok.encode("a") + tok.encode("\n\n") + tok.encode("1")
    assert len(tok.encode("\n\n")) == 1
    assert ref.encode("a\n\n1", add_special_tokens=False) != tok.encode("a\n\n1")  # transformers' fallback
    assert tok.encode("12345") == [tok.encode(d)[0] for d in "12345"]
    assert tok.encode("<|im_start|>user") == [1, 4093]  # special text -> its id
    assert tok.encode("hi", add_special_tokens=True) == ref.encode("hi", add_special_tokens=True)


def test_decode_round_trips(tok: Tokenizer, ref) -> None:
    for text in corpus():
        ids = tok.encode(text)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        if "<|" not in text and "<repo" not in text:
            assert tok.decode(ids) == text
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    spaced = "<|im_start|> user\nhi <|im_end|> <|im_end|>"  # HF slow tokenizers' (and vLLM's) spacing
    assert tok.decode(ids + ids[-1:], skip_special_tokens=False, spaces_between_special_tokens=True) == spaced
    out, prefix, read = "", 0, 0
    for n in range(1, len(ids) + 2):
        delta, prefix, read = tok.decode_incremental((ids + ids[-1:])[:n], prefix, read, False, True)
        out += delta
    assert out == spaced  # streamed, the same text


def stream(tok: Tokenizer, ids: list[int], start: int = 0) -> list[str]:
    """Reveal ids[start:] one token at a time, collecting the deltas."""
    prefix, read = max(start - 5, 0), start
    deltas = []
    for n in range(start + 1, len(ids) + 1):
        delta, prefix, read = tok.decode_incremental(ids[:n], prefix, read)
        deltas.append(delta)
    return deltas


def test_incremental_decode_concatenates_to_full_decode(tok: Tokenizer) -> None:
    emoji = "I ❤️ 🦀 and 👨‍👩‍👧 and 日本語"
    ids = tok.encode(emoji)
    # The test must cover a character split across tokens: some prefix decodes to a partial char.
    assert any(tok.decode(ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))
    for text in corpus() + [emoji]:
        ids = tok.encode(text)
        deltas = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids), text
        assert not any("\ufffd" in d for d in deltas)


def test_incremental_decode_after_prompt(tok: Tokenizer) -> None:
    prompt, answer = tok.encode("Q: what?\nA:"), tok.encode(" An answer 🎉 with 中文, done.")
    ids = prompt + answer
    assert "".join(stream(tok, ids, start=len(prompt))) == tok.decode(ids)[len(tok.decode(prompt)):]


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 日本 😀"},
    ],
    [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "  second\n\nwith blank lines  "},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_reference(tok: Tokenizer, ref, messages: list[dict]) -> None:
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False
    )


def test_chat_template_environment(tok: Tokenizer, ref) -> None:
    """Whitespace control, tojson without HTML escaping, extra kwargs and raise_exception as HF has them."""
    template = (
        "{% for m in messages %}\n  {{ m['content'] | tojson }}|{{ bos_token }}|{{ flag }}\n{% endfor %}"
        "{% if messages | length > 2 %}{{ raise_exception('too many') }}{% endif %}"
    )
    custom = Tokenizer(tok.backend, bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=template)
    messages = [{"role": "user", "content": "a <b> & \"ü\""}]
    got = custom.apply_chat_template(messages, flag=7)
    assert got == ref.apply_chat_template(messages, chat_template=template, tokenize=False, flag=7)
    assert '"a <b> & \\"ü\\""' in got
    with pytest.raises(jinja2.TemplateError, match="too many"):
        custom.apply_chat_template(messages * 3)


def test_hf_directory_tokenizer(tok: Tokenizer, ref, tmp_path) -> None:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) as transformers saves them."""
    ref.save_pretrained(tmp_path)
    hf = Tokenizer.from_dir(str(tmp_path))
    for text in corpus()[:100]:
        assert hf.encode(text) == tok.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.special_ids) == (1, 2, tok.special_ids)
    assert hf.apply_chat_template(CONVERSATIONS[2]) == tok.apply_chat_template(CONVERSATIONS[2])


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_tokenizers_match_sentencepiece(tmp_path, model_type: str) -> None:
    """tokenizer.model (HF dirs) and a GGUF's "llama" vocabulary give sentencepiece's own ids."""
    import sentencepiece as spm

    rng = random.Random(1)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "tokenizer", "café", "日本"]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "tokenizer"), vocab_size=340, hard_vocab_limit=False,
        model_type=model_type, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    hf = Tokenizer.from_dir(str(tmp_path))
    n = sp.get_piece_size()
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                                      else 1 for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
    }
    # llama.cpp merges a "llama" vocabulary by score (BPE-like) whatever it was trained as, so
    # sentencepiece is its reference only for BPE-trained vocabularies.
    gg = Tokenizer.from_gguf_metadata(meta) if model_type == "bpe" else None
    texts = ["the quick brown fox", "lazy dog jumps", " leading space", "two  spaces", "café 日本 Ω unseen",
             "tokenizer over the dog", "x", "🎉 emoji falls back to bytes"]
    for text in texts:
        want = sp.encode(text)
        assert hf.encode(text) == want, text
        assert hf.encode(text, add_special_tokens=True) == [sp.bos_id()] + want
        assert hf.decode(want) == sp.decode(want)
        if gg is not None:
            assert gg.encode(text) == want, text
            assert gg.decode(want) == sp.decode(want)


def test_chat_prompt_gets_the_templates_bos_once(tmp_path) -> None:
    """A vocabulary that adds BOS when encoding plain text, with a chat template that writes BOS itself (Llama 2
    and 3 do): the chat prompt starts with exactly one BOS, as transformers' apply_chat_template(tokenize=True)."""
    import sentencepiece as spm

    lines = [" ".join(["hello", "world", "chat", "template"] * 3) for _ in range(50)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=300, hard_vocab_limit=False, byte_fallback=True, minloglevel=2)
    tok = Tokenizer.from_dir(str(tmp_path))
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    bos = tok.bos_token_id
    assert tok.encode("hello", add_special_tokens=True)[0] == bos  # plain prompts do get one
    ids = tok.encode_chat([{"role": "user", "content": "hello world"}])
    assert ids[0] == bos and ids.count(bos) == 1
