"""The HTTP layer's pure parts, without a model: request parsing, SSE framing, response shapes, plans, metrics."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import orjson
import pytest

from engine.step import TokenLogprobs
from serving import sse
from serving.api import InstanceStats
from serving.errors import ApiError
from serving.metrics import ServerMetrics
from serving.plan import PlanError, load_plan
from serving.protocol import parse_chat, parse_completion
from serving.responses import Choice, Formatter, usage
from serving.schema import MAX_N


def render(msgs: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
    """A stand-in chat template: <role>content per message, then the generation prompt; kwargs shown as {k=v}."""
    extra = "".join(f"{{{k}={v}}}" for k, v in sorted(kwargs.items()))
    return extra + "".join(f"<{m['role']}>{m['content']}</>" for m in msgs) + ("<assistant>" * add_generation_prompt)


def err(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args)
    assert e.value.status == 400
    body = e.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    return e.value


# ---------------- completions ----------------
@pytest.mark.parametrize("prompt, want", [
    ("hi", ["hi"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_prompt_forms(prompt, want):
    assert parse_completion({"model": "m", "prompt": prompt}).prompts == want


@pytest.mark.parametrize("prompt", ["", [], [""], ["a", ""], [[]], None, 5, [1.5], [True], ["a", 1], {"x": 1}])
def test_bad_prompts_name_the_field(prompt):
    body = {"prompt": prompt} if prompt is not None else {}
    assert err(parse_completion, body).param == "prompt"


def test_defaults_and_mapping():
    r = parse_completion({"prompt": "x"})
    assert (r.params.max_tokens, r.params.temperature, r.n, r.stream, r.logprobs) == (16, 1.0, 1, False, None)
    r = parse_completion({"prompt": "x", "max_tokens": 5, "temperature": 0, "top_p": 0.5, "top_k": 3, "min_p": 0.1,
                          "seed": 7, "stop": "\n", "presence_penalty": 0.5, "frequency_penalty": -0.5, "n": 3,
                          "logprobs": 2, "ignore_eos": True, "user": "u", "stream": True,
                          "stream_options": {"include_usage": True}})
    p = r.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.stop) == (5, 0.0, 0.5, 3, 0.1, 7, ["\n"])
    assert (p.presence_penalty, p.frequency_penalty, p.logprobs, p.ignore_eos) == (0.5, -0.5, 2, True)
    assert (r.n, r.logprobs, r.user, r.stream, r.include_usage) == (3, 2, "u", True, True)
    # n > 1 with a seed: distinct, reproducible seeds; every choice gets its own params object
    seeds = [r.choice_params(i).seed for i in range(3)]
    assert seeds == [7, 8, 9] and r.choice_params(0) is not r.choice_params(0)
    assert parse_completion({"prompt": "x", "n": 2}).choice_params(1).seed is None


def test_null_means_default():
    r = parse_completion({"prompt": "x", "max_tokens": None, "temperature": None, "echo": None, "suffix": None,
                          "logit_bias": None, "best_of": None, "stop": None})
    assert r.params.max_tokens == 16 and r.params.temperature == 1.0


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", "8"), ("max_tokens", 1.5), ("max_tokens", True),
    ("temperature", "hot"), ("temperature", -0.1), ("temperature", 2.5), ("top_p", 0), ("top_p", 1.1),
    ("top_k", -2), ("min_p", 2), ("presence_penalty", 3), ("frequency_penalty", -3), ("seed", "1"),
    ("n", 0), ("n", MAX_N + 1), ("logprobs", True), ("logprobs", 21), ("stop", 5), ("stop", [""]),
    ("stream", "yes"), ("ignore_eos", 1), ("user", 3), ("model", 1), ("stop_token_ids", ["a"]),
])
def test_bad_values_name_the_field(field, value):
    assert err(parse_completion, {"prompt": "x", field: value}).param == field


@pytest.mark.parametrize("field, value", [
    ("echo", True), ("suffix", "end"), ("best_of", 3), ("logit_bias", {"50256": -100}), ("metadata", {"a": "b"}),
])
def test_unsupported_features_are_refused_by_name(field, value):
    e = err(parse_completion, {"prompt": "x", field: value})
    assert e.param == field and e.code == "unsupported_parameter" and field in e.message


@pytest.mark.parametrize("field, value", [("echo", False), ("best_of", 1), ("logit_bias", {}), ("suffix", "")])
def test_noop_values_of_unsupported_features_pass(field, value):
    parse_completion({"prompt": "x", field: value})


def test_unknown_fields_are_ignored_and_reported_or_refused_when_strict():
    body = {"prompt": "x", "temprature": 0, "messages": [], "stream": True, "stream_options": {"x": 1}}
    r = parse_completion(body)  # vLLM's behaviour: ignored, and the server logs their names
    assert r.ignored == ["temprature", "messages", "stream_options.x"] and r.params.temperature == 1.0
    e = err(parse_completion, body, True)  # OpenAI's: --strict-params
    assert e.param == "temprature" and "temprature" in e.message and e.code == "unknown_parameter"
    assert err(parse_completion, {"prompt": "x", "messages": []}, True).param == "messages"  # chat-only field
    e = err(parse_completion, {"prompt": "x", "stream": True, "stream_options": {"x": 1}}, True)
    assert e.param == "stream_options.x"


def test_stream_options():
    assert err(parse_completion, {"prompt": "x", "stream_options": {"include_usage": True}}).param == "stream_options"
    assert not parse_completion({"prompt": "x", "stream": True, "stream_options": {}}).include_usage
    r = parse_completion({"prompt": "x", "stream": True,
                          "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert r.include_usage and r.continuous_usage
    r = parse_completion({"prompt": "x", "stream": True, "stream_options": {"continuous_usage_stats": True}})
    assert not r.continuous_usage  # vLLM: per-chunk usage only with include_usage
    e = err(parse_completion, {"prompt": "x", "stream": True, "stream_options": {"continuous_usage_stats": "y"}})
    assert e.param == "stream_options.continuous_usage_stats" and "boolean" in e.message


def test_vllm_sampling_extensions_reach_the_engine_params():
    r = parse_completion({"prompt": "x", "max_tokens": 9, "min_tokens": 3, "stop_token_ids": [5, 6],
                          "include_stop_str_in_output": True, "skip_special_tokens": False,
                          "spaces_between_special_tokens": False, "ignore_eos": True, "repetition_penalty": 1.1})
    p = r.params
    assert (p.min_tokens, p.stop_token_ids, p.include_stop_str_in_output) == (3, [5, 6], True)
    assert (p.skip_special_tokens, p.spaces_between_special_tokens, p.ignore_eos) == (False, False, True)
    assert p.repetition_penalty == 1.1
    e = err(parse_completion, {"prompt": "x", "max_tokens": 4, "min_tokens": 5})
    assert e.param == "min_tokens" and "(4)" in e.message
    assert err(parse_completion, {"prompt": "x", "min_tokens": -1}).param == "min_tokens"


def test_server_sampling_defaults_fill_only_what_the_request_leaves_out():
    defaults = {"temperature": 0.2, "top_p": 0.9}
    p = parse_completion({"prompt": "x"}, defaults=defaults).params
    assert (p.temperature, p.top_p, p.top_k) == (0.2, 0.9, 0)
    p = parse_completion({"prompt": "x", "temperature": 1.0, "top_p": None}, defaults=defaults).params
    assert (p.temperature, p.top_p) == (1.0, 0.9)  # null: the default, here the server's


@pytest.mark.parametrize("field, value", [
    ("use_beam_search", False), ("length_penalty", 1.0), ("priority", 0), ("allowed_token_ids", []),
    ("request_id", "abc"), ("truncate_prompt_tokens", None), ("guided_json", None),
])
def test_vllm_fields_at_their_defaults_pass(field, value):
    assert parse_completion({"prompt": "x", field: value}, True).ignored == []


@pytest.mark.parametrize("field, value", [
    ("use_beam_search", True), ("guided_json", {"type": "object"}), ("allowed_token_ids", [1]),
    ("truncate_prompt_tokens", 5), ("chat_template", "{{ x }}"),
])
def test_vllm_fields_that_would_change_output_are_refused_by_name(field, value):
    e = err(parse_completion, {"prompt": "x", field: value})
    assert e.param == field and e.code == "unsupported_parameter"


@pytest.mark.parametrize("body", [[], "x", 3, None])
def test_body_must_be_an_object(body):
    err(parse_completion, body)
    err(parse_chat, body, render)


# ---------------- chat ----------------
def test_chat_messages_render_and_defaults():
    msgs = [{"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
             "name": "bob"}]
    r = parse_chat({"model": "m", "messages": msgs}, render)
    assert r.prompts == ["<system>be brief</><user>hi there</><assistant>"]
    assert r.params.max_tokens is None and r.logprobs is None  # chat default: up to the context window
    r = parse_chat({"messages": msgs, "max_completion_tokens": 4, "max_tokens": 9, "logprobs": True,
                    "top_logprobs": 3}, render)
    assert (r.params.max_tokens, r.logprobs, r.params.logprobs) == (4, 3, 3)
    assert parse_chat({"messages": msgs, "logprobs": True}, render).logprobs == 0
    assert parse_chat({"messages": msgs, "logprobs": False}, render).logprobs is None


@pytest.mark.parametrize("body, param", [
    ({}, "messages"), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{}]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 2}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "prompt"),
])
def test_bad_chat_requests(body, param):
    assert err(parse_chat, body, render, True).param == param


def test_chat_template_extensions():
    msgs = [{"role": "user", "content": "hi"}]
    assert parse_chat({"messages": msgs, "add_generation_prompt": False}, render).prompts == ["<user>hi</>"]
    r = parse_chat({"messages": msgs, "chat_template_kwargs": {"enable_thinking": False}}, render)
    assert r.prompts == ["{enable_thinking=False}<user>hi</><assistant>"]
    cont = msgs + [{"role": "assistant", "content": "Once upon"}]
    r = parse_chat({"messages": cont, "continue_final_message": True, "add_generation_prompt": False}, render)
    assert r.prompts == ["<user>hi</><assistant>Once upon"]  # open-ended: the model carries on the last turn
    assert err(parse_chat, {"messages": cont, "continue_final_message": True}, render).param == "continue_final_message"
    r = parse_chat({"messages": msgs + [{"role": "assistant", "content": None}], "stop": None,
                    "max_completion_tokens": None}, render)  # null where OpenAI allows it
    assert r.prompts == ["<user>hi</><assistant></><assistant>"] and r.params.stop == []


def test_chat_noops_and_template_errors():
    ok = {"messages": [{"role": "user", "content": "x"}], "tools": [], "tool_choice": "none",
          "response_format": {"type": "text"}, "parallel_tool_calls": False, "store": False}
    parse_chat(ok, render)

    def failing(_msgs, *args, **kwargs):
        raise ValueError("Conversation roles must alternate")
    assert "alternate" in err(parse_chat, {"messages": [{"role": "user", "content": "x"}]}, failing).message


# ---------------- SSE framing ----------------
def test_sse_event_is_one_data_line():
    raw = sse.event({"text": "a\nb\r\n\n", "x": None}) + sse.DONE
    events = sse.parse(raw)
    assert raw.count(b"\n\n") == 2 and orjson.loads(events[0]) == {"text": "a\nb\r\n\n", "x": None}
    assert events[1] == b"[DONE]"
    for broken in (b"data: {}\n", b"event: x\ndata: {}\n\n", b"data:{}\n\n"):
        with pytest.raises(ValueError):
            sse.parse(broken)


# ---------------- responses ----------------
class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return {1: "He", 2: "llo", 3: " wörld", 4: "<eos>"}[ids[0]]


def test_completion_logprobs_offsets_and_usage():
    f = Formatter(_Tok(), "m")
    c = Choice(0, text="Hello wörld", num_tokens=3, prompt_tokens=4,
               logprobs=[TokenLogprobs(i, -0.5, [(i, -0.5), (4, -2.0)]) for i in (1, 2, 3)])
    resp = f.completion_response("id", 0, [c], 1, logprobs=True)
    lp = resp["choices"][0]["logprobs"]
    assert lp["tokens"] == ["He", "llo", " wörld"] and lp["text_offset"] == [0, 2, 5]
    assert lp["top_logprobs"][0] == {"He": -0.5, "<eos>": -2.0}
    assert resp["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    chat = f.chat_logprobs(c.logprobs)["content"][2]
    assert chat["token"] == " wörld" and bytes(chat["bytes"]).decode() == " wörld" and len(chat["top_logprobs"]) == 2


def test_usage_counts_each_prompt_once_with_n():
    choices = [Choice(i, num_tokens=2, prompt_tokens=5 if i < 3 else 7) for i in range(6)]  # 2 prompts x n=3
    assert usage(choices, 2) == {"prompt_tokens": 12, "completion_tokens": 12, "total_tokens": 24}


def test_chat_chunks_open_with_the_role_once():
    f, c = Formatter(_Tok(), "m"), Choice(1)
    first = f.chat_chunk("id", 0, c, "", None, None, include_usage=True)
    second = f.chat_chunk("id", 0, c, "x", None, "stop", include_usage=False)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["usage"] is None
    assert second["choices"][0] == {"index": 1, "delta": {"content": "x"}, "logprobs": None, "finish_reason": "stop"}
    assert "usage" not in second


# ---------------- plans ----------------
def _plan(tmp_path, plan: dict) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return str(path)


def test_plan_runs_as_is_when_it_fits(tmp_path):
    core = min(os.sched_getaffinity(0))
    plan = {"mode": "disagg", "prefill": {"tp": 1, "pp": 1, "instances": 1}, "decode": {"tp": 1, "pp": 1},
            "devices": {"prefill_devices": [f"cpu:{core}"], "decode_devices": [f"cpu:{core}"]}}
    assert load_plan(_plan(tmp_path, plan)) == {"mode": "disagg", "prefill_devices": [f"cpu:{core}"],
                                                "decode_devices": [f"cpu:{core}"]}
    plan = {"mode": "colocated", "devices": ["cpu", "cpu"]}
    assert load_plan(_plan(tmp_path, plan)) == {"mode": "colocated", "devices": ["cpu", "cpu"],
                                                "chunked_prefill": False}


def test_colocated_plan_with_chunked_prefill_runs_chunked(tmp_path):
    """The planner writes "chunked_prefill" for a chunked colocated layout: the server must run it chunked."""
    import server

    plan = {"mode": "colocated", "colocated": {"tp": 1, "pp": 1, "instances": 1}, "devices": ["cpu"],
            "chunked_prefill": True}
    assert load_plan(_plan(tmp_path, plan))["chunked_prefill"] is True
    config = server.engine_config(server.build_parser().parse_args(["--plan", _plan(tmp_path, plan)]))
    assert config.mode == "colocated" and config.chunked_prefill and config.devices == ["cpu"]
    with pytest.raises(PlanError, match="chunked_prefill"):
        load_plan(_plan(tmp_path, {**plan, "chunked_prefill": "yes"}))


@pytest.mark.parametrize("plan, words", [
    ({"mode": "disagg", "prefill": {"tp": 2, "pp": 1}, "decode": {"tp": 1, "pp": 1},
      "devices": {"prefill_devices": ["cpu"], "decode_devices": ["cpu"]}}, "tensor parallelism 2"),
    ({"mode": "colocated", "colocated": {"tp": 1, "pp": 4}, "devices": ["cpu"]}, "pipeline parallelism 4"),
    ({"mode": "disagg", "devices": {"prefill_devices": ["cuda:7"], "decode_devices": ["cpu"]}}, "cuda:7"),
    ({"mode": "colocated", "devices": ["cpu:4096"]}, "4096"),
    ({"mode": "colocated", "colocated": {"instances": 2}, "devices": ["cpu"]}, "2 instances"),
    ({"mode": "sideways"}, "mode"),
])
def test_plan_that_cannot_run_here_says_why(tmp_path, plan, words):
    with pytest.raises(PlanError, match=words):
        load_plan(_plan(tmp_path, plan))


def test_plan_across_nodes_runs_under_cluster_ray_only(tmp_path):
    """The planner's multi-node plan (CPU profile, 2 nodes x 1 core) names each instance's node."""
    import server
    from engine.args import EngineArgs
    from scheduler.planner.placement import _device_strings
    from scheduler.planner.search import Cluster

    class CpuProfile:
        device_kind = "cpu"

    pre, dec = _device_strings(CpuProfile(), Cluster(2, 1), [1, 1])  # type: ignore[arg-type]
    assert (pre, dec) == ("node0/cpu:0", "node1/cpu:0")
    plan = {"mode": "disagg", "prefill": {"tp": 1, "pp": 1, "instances": 1}, "decode": {"tp": 1, "pp": 1},
            "devices": {"prefill_devices": [pre], "decode_devices": [dec]}}
    path = _plan(tmp_path, plan)
    with pytest.raises(PlanError, match="--cluster ray"):
        load_plan(path)
    assert server.main(["--plan", path]) == 2
    config = server.engine_config(server.build_parser().parse_args(["--plan", path, "--cluster", "ray"]))
    assert (config.cluster, config.prefill_devices, config.decode_devices) == ("ray", [pre], [dec])
    with pytest.raises(ValueError, match="--cluster ray"):
        EngineArgs(mode="disagg", prefill_devices=[pre], decode_devices=["cpu"]).engine_config()
    with pytest.raises(PlanError, match="nodeK"):
        load_plan(_plan(tmp_path, {**plan, "devices": {"prefill_devices": ["rack1/cpu:0"],
                                                        "decode_devices": [dec]}}), "ray")


# ---------------- metrics ----------------
def test_metrics_registry_is_per_app_and_reads_engine_stats():
    rows = [InstanceStats("prefill0", "prefill", "cpu:0", kv_blocks_used=3, kv_blocks_total=10, waiting=2,
                          prefilling=1, migrating=0, running=0, swapped=0)]
    a, b = ServerMetrics(lambda: rows), ServerMetrics(lambda: rows)  # a second registry: no duplicate error
    a.requests.labels("/v1/completions", "200").inc()
    text = a.render().decode()
    assert 'distserve_kv_blocks_used{device="cpu:0",instance="prefill0",role="prefill"} 3.0' in text
    assert 'distserve_waiting_requests{device="cpu:0",instance="prefill0",role="prefill"} 2.0' in text
    assert 'distserve_prefilling_requests{device="cpu:0",instance="prefill0",role="prefill"} 1.0' in text
    assert 'distserve_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text
    rows[0] = replace(rows[0], kv_blocks_used=0)  # read at scrape time
    assert 'distserve_kv_blocks_used{device="cpu:0",instance="prefill0",role="prefill"} 0.0' in b.render().decode()


# ---------------- CLI ----------------
def test_cli_help_lists_every_flag(capsys):
    import server

    with pytest.raises(SystemExit):
        server.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--host", "--port", "--mode", "--prefill-devices", "--decode-devices", "--max-num-seqs",
                 "--kv-cache-memory", "--api-key", "--plan", "--chunked-prefill", "--devices", "--dtype",
                 "--max-waiting", "--max-body-bytes", "--grace-period", "--log-level", "--served-model-name",
                 "--strict-params", "--default-temperature", "--default-top-p", "--slo-ttft", "--slo-tpot"):
        assert flag in out, flag


def test_cli_api_key_from_environment_and_loopback_default(monkeypatch):
    import server

    monkeypatch.setenv("API_KEY", "s3cret")
    args = server.build_parser().parse_args([])
    assert (args.api_key, args.host, args.mode) == ("s3cret", "127.0.0.1", "disagg")
    cfg = server.engine_config(args)
    assert cfg.mode == "disagg" and cfg.prefill_devices and cfg.decode_devices


@pytest.mark.parametrize("argv, words", [
    (["--chunked-prefill"], "colocated only"),
    (["--mode", "colocated", "--prefill-devices", "cpu"], "disagg only"),
    (["--kv-cache-memory", "lots"], "cannot parse size"),
    (["--port", "70000"], "port"),
])
def test_cli_rejects_bad_flag_combinations_with_exit_2(capsys, argv, words):
    import server

    assert server.main(argv) == 2 and words in capsys.readouterr().err


def test_cli_plan_needing_tensor_parallelism_exits_2(tmp_path, capsys):
    import server

    plan = {"mode": "disagg", "prefill": {"tp": 2, "pp": 1, "instances": 1}, "decode": {"tp": 1, "pp": 1},
            "devices": {"prefill_devices": ["cpu"], "decode_devices": ["cpu"]}}
    assert server.main(["--plan", _plan(tmp_path, plan)]) == 2
    assert "plan needs tensor parallelism 2" in capsys.readouterr().err


# ---------------- what real clients send (recorded: python -m bench.interop --capture) ----------------
PAYLOADS = json.loads(open(os.path.join(os.path.dirname(__file__), "data", "client_payloads.json")).read())
RECORDED = [(client, path, body) for client, bodies in PAYLOADS.items() if client != "_"
            for path, body in bodies.items()]


@pytest.mark.parametrize("client, path, body", RECORDED, ids=[f"{c}{p}" for c, p, _ in RECORDED])
def test_recorded_client_bodies_parse_even_under_strict_params(client, path, body):
    """guidellm sends vLLM's extensions (continuous_usage_stats, ignore_eos, max_completion_tokens); every field
    each client sends is one we know, so they work under --strict-params too."""
    def parse(b):
        return parse_completion(b, True) if path == "/v1/completions" else parse_chat(b, render, True)

    req = parse(body)
    assert req.params.ignore_eos and req.params.max_tokens == 4 and req.stream and req.include_usage
    assert req.continuous_usage == client.startswith("guidellm") and not req.ignored
    assert parse({**body, "stop": None}).params.stop == []  # the report: guidellm may send stop: null
