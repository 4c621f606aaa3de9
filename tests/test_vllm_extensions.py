"""vLLM's sampling extensions change the output as vLLM documents, end to end on the bundled model (greedy)."""
from __future__ import annotations

import pytest

from engine.config import SamplingParams
from serving.llm import LLM

CHAT = [{"role": "user", "content": "Hi!"}]


@pytest.fixture(scope="module")
def llm(ckpt):
    with LLM(mode="colocated", dtype="float32", num_kv_blocks=128, checkpoint=ckpt) as llm:
        yield llm


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **{"max_tokens": 24, **kw})


def test_extensions_change_the_output(llm):
    eos = llm.tokenizer.eos_token_id  # <|im_end|> ends the assistant's turn
    base = llm.chat(CHAT, greedy())
    n = len(base.token_ids)
    assert base.finish_reason == "stop" and base.token_ids[-1] == eos and 3 < n < 24  # "Hello! How can I ..."

    longer = llm.chat(CHAT, greedy(min_tokens=n + 4))  # EOS may not end it before min_tokens
    assert len(longer.token_ids) >= n + 4 and eos not in longer.token_ids[: n + 3]

    shown = llm.chat(CHAT, greedy(skip_special_tokens=False, include_stop_str_in_output=True))
    assert shown.text == base.text + " <|im_end|>"  # the stop token's own text, kept; spaced (vLLM's default)
    tight = llm.chat(CHAT, greedy(skip_special_tokens=False, include_stop_str_in_output=True,
                                  spaces_between_special_tokens=False))
    assert tight.text == base.text + "<|im_end|>"

    bang = llm.tokenizer.encode("!")[0]
    cut = llm.chat(CHAT, greedy(stop_token_ids=[bang]))
    assert cut.finish_reason == "stop" and cut.token_ids[-1] == bang and cut.text == base.text.split("!")[0]
    kept = llm.chat(CHAT, greedy(stop_token_ids=[bang], include_stop_str_in_output=True))
    assert kept.text == cut.text + "!"
    llm.check()  # every KV block back
