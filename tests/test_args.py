"""One definition of the engine's knobs (engine/args.py): the server's flags and LLM(...)'s keywords."""
from __future__ import annotations

from dataclasses import fields

import pytest

import server
from engine.args import EngineArgs


def test_every_engine_knob_is_a_server_flag():
    parser = server.build_parser()
    for f in fields(EngineArgs):
        assert "--" + f.name.replace("_", "-") in parser._option_string_actions, f.name
    args = parser.parse_args(["--transfer", "torch", "--max-prefill-seqs", "3", "--swap-space", "1GiB",
                              "--prefill-devices", "cpu", "--decode-devices", "cpu", "--num-kv-blocks", "40"])
    config = server.engine_config(args)
    assert config.mode == "disagg"  # the server's default layout
    assert config.transfer == "torch" and config.scheduler.max_prefill_seqs == 3
    assert config.swap_space_bytes == 2**30 and config.cache.num_blocks == 40
    assert config.prefill_devices == config.decode_devices == ["cpu"]


def test_llm_keywords_are_the_same_knobs():
    config = EngineArgs(mode="colocated", chunked_prefill=True, chunk_budget=64, max_prefill_seqs=3).engine_config()
    assert config.chunked_prefill and config.scheduler.chunk_budget == 64 and config.scheduler.max_prefill_seqs == 3
    with pytest.raises(TypeError, match="no_such_knob"):
        EngineArgs(no_such_knob=1)


@pytest.mark.parametrize("kw, words", [
    (dict(mode="disagg", devices=["cpu"]), "colocated only"),
    (dict(mode="colocated", prefill_devices=["cpu"]), "disagg only"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(kv_cache_memory="lots"), "cannot parse size"),
])
def test_bad_knobs_say_what_is_wrong(kw, words):
    with pytest.raises(ValueError, match=words):
        EngineArgs(**kw).engine_config()


def test_the_decode_phase_may_run_its_own_precision():
    """disagg: decode_dtype / decode_weights default to the server's; native decode weights alone bring their own
    dtype (auto: float32); prefill instances keep the server's; only disagg layouts take them."""
    from engine.config import EngineConfig

    base = dict(mode="disagg", prefill_devices=["cpu"], decode_devices=["cpu"], dtype="bfloat16")
    assert EngineConfig(**base).precision("decode") == ("bfloat16", "auto")
    assert EngineConfig(**base, decode_weights="native").precision("decode") == ("auto", "native")
    assert EngineConfig(**base, decode_weights="dense").precision("decode") == ("bfloat16", "dense")
    both = EngineConfig(**base, decode_dtype="float32", decode_weights="native")
    assert both.precision("decode") == ("float32", "native") and both.precision("prefill") == ("bfloat16", "auto")
    with pytest.raises(ValueError, match="decode_weights"):
        EngineConfig(**base, decode_weights="int8")
    with pytest.raises(ValueError, match="disagg"):
        EngineConfig(decode_dtype="float32")
