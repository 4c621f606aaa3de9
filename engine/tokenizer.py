"""One tokenizer over the `tokenizers` library: built from a GGUF's metadata, a tokenizer.json or a
sentencepiece tokenizer.model, with HF-compatible chat templates and incremental detokenization."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from engine.hf_checkpoint import read_json

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's pre-tokenizer names -> the split regex the vocabulary was trained with (as in
# llama-vocab.cpp and transformers' GGUF loader). None: GPT-2's regex, inside ByteLevel.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS: dict[str, str | None] = {
    "default": None, "gpt-2": None, "gpt2": None,
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# These split every digit off first, then GPT-2's regex (HF: Digits(individual) + ByteLevel).
_DIGIT_SPLIT = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
# Chat-template markers that end an assistant turn; HF generation configs list them as eos.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


def _byte_level(pre: str | None) -> pre_tokenizers.PreTokenizer:
    pre = pre or "default"
    if pre in _DIGIT_SPLIT:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre not in _SPLITS:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(_SPLITS) + sorted(_DIGIT_SPLIT)}")
    if _SPLITS[pre] is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _merges_from_scores(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Sentencepiece BPE merges the highest-scoring pair first: recover a ranked merge list
    (every split of a piece into two pieces, ordered by the merged piece's score)."""
    merges = []
    for piece, pid in vocab.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((-scores[pid], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def sentencepiece_backend(tokens: list[str], scores: list[float], types: list[int], *,
                          unigram: bool = False, add_prefix_space: bool = True) -> Backend:
    """A Llama-style sentencepiece tokenizer (byte fallback, "▁" for spaces), model and decoder as
    HF's LlamaTokenizer builds them. sentencepiece's normalizer rules (nmt_nfkc...) are not reproduced."""
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = next((i for i, t in enumerate(types) if t == UNKNOWN), 0)
    if unigram:
        model = models.Unigram(list(zip(tokens, scores, strict=True)), unk_id=unk, byte_fallback=True)
    else:
        model = models.BPE(vocab, _merges_from_scores(vocab, scores), unk_token=tokens[unk],
                           fuse_unk=True, byte_fallback=True)
    backend = Backend(model)
    # sentencepiece (and llama.cpp) prefix "▁" to every text run, even one that starts with a space,
    # and after special tokens; HF's Metaspace(prepend_scheme="first") does neither, so normalize.
    spaces = normalizers.Replace(" ", "▁")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), spaces]) if add_prefix_space else spaces
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _add_special(backend: Backend, tokens: list[str], types: list[int]) -> None:
    """Control tokens match whole and are special; user-defined ones match whole but stay text."""
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, k in zip(tokens, types, strict=True) if k == CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, k in zip(tokens, types, strict=True) if k == USER_DEFINED])


def _set_bos(backend: Backend, bos: str | None, add_bos: bool) -> None:
    if add_bos and bos is not None:
        bos_id = backend.token_to_id(bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )


class Tokenizer:
    """encode/decode, chat template and incremental detokenization over a `tokenizers` backend."""

    def __init__(self, backend: Backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, template_vars: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = None if bos_token is None else backend.token_to_id(bos_token)
        self.eos_token_id = None if eos_token is None else backend.token_to_id(eos_token)
        self.special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.chat_template = chat_template
        self.template_vars = {"bos_token": bos_token, "eos_token": eos_token, **(template_vars or {})}
        self._template: jinja2.Template | None = None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """`meta`: GGUF key -> plain Python value (strings, ints, lists)."""
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        kind = meta.get("tokenizer.ggml.model")
        if kind == "gpt2":
            vocab = {t: i for i, t in enumerate(tokens)}
            merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
            backend = Backend(models.BPE(vocab, merges))
            backend.pre_tokenizer = _byte_level(meta.get("tokenizer.ggml.pre"))
            backend.decoder = decoders.ByteLevel()
            add_bos_default = False
        elif kind == "llama":
            backend = sentencepiece_backend(tokens, meta["tokenizer.ggml.scores"], types,
                                            add_prefix_space=meta.get("tokenizer.ggml.add_space_prefix", True))
            add_bos_default = True  # llama.cpp adds BOS to sentencepiece vocabularies unless told not to
        else:
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r}; supported: gpt2, llama")
        _add_special(backend, tokens, types)

        def token(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return None if i is None else tokens[i]

        _set_bos(backend, token("bos_token_id"), meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
        extra = {"unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
        return cls(backend, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
                   chat_template=meta.get("tokenizer.chat_template"), template_vars=extra)

    @classmethod
    def from_dir(cls, path: str) -> Tokenizer:
        """A HF model directory: tokenizer.json (or tokenizer.model) + tokenizer_config.json."""
        cfg = read_json(os.path.join(path, "tokenizer_config.json"), missing_ok=True)
        special = {k: _token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            backend = Backend.from_file(os.path.join(path, "tokenizer.json"))
        elif os.path.exists(os.path.join(path, "tokenizer.model")):
            backend, bos, eos = _from_sentencepiece_file(os.path.join(path, "tokenizer.model"))
            special["bos_token"] = special["bos_token"] or bos
            special["eos_token"] = special["eos_token"] or eos
            _set_bos(backend, special["bos_token"], cfg.get("add_bos_token", True))
        else:
            raise ValueError(f"no tokenizer.json or tokenizer.model in {path}")
        # tokenizer_config may declare added/special tokens the backend does not know yet.
        for tid, tok in sorted((int(k), v) for k, v in cfg.get("added_tokens_decoder", {}).items()):
            if backend.token_to_id(tok["content"]) is None or tid not in backend.get_added_tokens_decoder():
                at = AddedToken(tok["content"], normalized=False, special=tok.get("special", False))
                (backend.add_special_tokens if tok.get("special") else backend.add_tokens)([at])
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.exists(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        return cls(backend, bos_token=special["bos_token"], eos_token=special["eos_token"],
                   chat_template=template, template_vars={k: special[k] for k in ("unk_token", "pad_token")})

    # ---- the interface ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Special-token text (e.g. "<|im_start|>") maps to its id either way, as in HF."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = False) -> str:
        """spaces_between_special_tokens (only when they are shown): a space on each side of a special
        token, between it and the text or token next to it, as HF's slow tokenizers and vLLM do."""
        if skip_special_tokens or not spaces_between_special_tokens or not self.special_ids.intersection(ids):
            return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        parts, run = [], []
        for i in ids:
            if i in self.special_ids:
                if run:
                    parts.append(self.backend.decode(run, skip_special_tokens=False))
                parts.append(self.backend.decode([i], skip_special_tokens=False))
                run = []
            else:
                run.append(i)
        if run:
            parts.append(self.backend.decode(run, skip_special_tokens=False))
        return " ".join(parts)

    def decode_incremental(self, ids: list[int], prefix_offset: int, read_offset: int,
                           skip_special_tokens: bool = True,
                           spaces_between_special_tokens: bool = False) -> tuple[str, int, int]:
        """vLLM/TGI-style streaming: decode ids[prefix_offset:] against ids[prefix_offset:read_offset]
        and return (new text, prefix_offset, read_offset). Text is held back while it ends in an
        incomplete UTF-8 sequence ("\ufffd"). Start a stream with (0, 0), or after a prompt p with
        (max(len(p) - 5, 0), len(p)); a few tokens of left context keep sentencepiece's spaces right."""
        prefix = self.decode(ids[prefix_offset:read_offset], skip_special_tokens, spaces_between_special_tokens)
        text = self.decode(ids[prefix_offset:], skip_special_tokens, spaces_between_special_tokens)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            return text[len(prefix):], read_offset, len(ids)
        return "", prefix_offset, read_offset

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Chat messages -> prompt token ids, as transformers' apply_chat_template(tokenize=True): the
        template places every special token itself, so none is added (a BOS it emits is not doubled)."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render like transformers' apply_chat_template(tokenize=False)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            self._template = _compile(self.chat_template)
        variables = {**self.template_vars, **kwargs}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)


def _compile(source: str) -> jinja2.Template:
    """The environment transformers builds for chat templates (sandboxed, trim/lstrip blocks)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        # Unlike jinja's own tojson, no HTML escaping.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _from_sentencepiece_file(path: str) -> tuple[Backend, str | None, str | None]:
    """The backend, and the model's own bos / eos pieces."""
    import sentencepiece as spm  # only for tokenizer.model checkpoints

    sp = spm.SentencePieceProcessor(model_file=path)
    ids = range(sp.get_piece_size())
    pieces, scores = [sp.id_to_piece(i) for i in ids], [sp.get_score(i) for i in ids]
    # sentencepiece's API has no "is user-defined"; such pieces are treated as normal ones.
    types = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
             else UNUSED if sp.is_unused(i) else NORMAL for i in ids]
    with open(path, "rb") as f:
        trainer_spec = next((v for k, v in _proto_fields(f.read()) if k == 2), b"")
    model_type = next((v for k, v in _proto_fields(trainer_spec) if k == 3), 1)  # 1 unigram (default), 2 bpe
    backend = sentencepiece_backend(pieces, scores, types, unigram=model_type == 1)
    _add_special(backend, pieces, types)
    bos, eos = sp.bos_id(), sp.eos_id()  # -1 when the model has none
    return backend, pieces[bos] if bos >= 0 else None, pieces[eos] if eos >= 0 else None


def _proto_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a serialized protobuf message; enough to read a ModelProto's
    trainer_spec.model_type without depending on protobuf."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            b = data[pos]
            pos, value, shift = pos + 1, value | (b & 0x7F) << shift, shift + 7
            if b < 0x80:
                return value

    while pos < len(data):
        key = varint()
        wire = key & 7
        if wire == 0:
            yield key >> 3, varint()
        elif wire == 2:
            n = varint()
            pos += n
            yield key >> 3, data[pos - n:pos]
        else:  # fixed 64 / 32 bit
            pos += 8 if wire == 1 else 4


def _token_str(value: Any) -> str | None:
    """tokenizer_config writes special tokens as strings or as {"content": ...} dicts."""
    return value.get("content") if isinstance(value, dict) else value
