"""The HTTP front door end to end: a real `server.py` subprocess on the default model, driven by the official
`openai` client and by raw HTTP; plus an in-process app around a fake engine for the failure paths a real
engine cannot be pushed into quickly (a full admission queue, an engine error, the drain's abort).

Greedy-equality tests run the server and the offline API in float32: bf16 matmuls depend on the batch shape,
so ties could flip between a batch of 64 and the offline batch.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import orjson
import pytest
from aiohttp import ClientSession, ClientTimeout
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from bench.server_process import ServerProcess
from engine.config import EngineConfig, SamplingParams
from server import STATE, ServerConfig, create_app, drain
from serving import sse
from serving.api import InstanceStats, QueueFullError, RequestOutput
from serving.info import health

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key"
PROMPTS = ["Hello, my name is", "The capital of France is", "1, 2, 3, 4,", "Once upon a time", "def fib(n):",
           "The weather today", "My favourite food is", "In 1969, humans"]


# ================= in-process: an app around a fake engine =================
class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        return " ".join(m["content"] for m in messages)

    def encode(self, text, add_special_tokens=False):  # characters as token ids
        return [ord(c) for c in text]

    def encode_chat(self, messages, add_generation_prompt=True, **kwargs):
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))


class FakeEngine:
    """A serving.api.EngineClient without a model. add_request's contract: "full" -> QueueFullError,
    "boom" -> a stream that fails, "slow" -> waits for abort; otherwise max_tokens "x"s."""

    model_name, max_model_len = "fake", 64
    config = EngineConfig()
    step_trace = None  # --step-trace off

    def __init__(self) -> None:
        self.tokenizer, self.aborted, self.waiters, self.prompts, self.params = _Tok(), [], {}, [], []

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def stats(self) -> list[InstanceStats]:
        return [InstanceStats("c0", "colocated", "cpu", 0, 8, 0, 0, 0, 0, 0)]

    def abort(self, rid: str) -> None:
        self.aborted.append(rid)
        if rid in self.waiters:
            self.waiters[rid].set()

    def add_request(self, prompt, params: SamplingParams, request_id: str):
        self.prompts.append(prompt)
        prompt = prompt if isinstance(prompt, str) else "".join(map(chr, prompt))
        if prompt == "full":
            raise QueueFullError("admission queue full (9 waiting)")
        self.params.append(params)
        return self._stream(prompt, params, request_id)

    async def _stream(self, prompt, params, rid):
        if prompt == "boom":
            raise RuntimeError("engine exploded")
        if prompt == "slow":
            self.waiters[rid] = ev = asyncio.Event()
            await ev.wait()
            yield RequestOutput(rid, [1], finished=True, finish_reason="abort", token_ids=[], text="")
            return
        for i in range(params.max_tokens):
            last = i == params.max_tokens - 1
            yield RequestOutput(rid, [1, 2], [i], "x", num_tokens=i + 1, finished=last,
                                finish_reason="length" if last else None,
                                token_ids=list(range(i + 1)) if last else None, text="x" * (i + 1) if last else None)


def _in_process(test, **config):
    async def run():
        app = create_app(FakeEngine(), ServerConfig(**config))
        async with TestClient(TestServer(app)) as client:
            await test(app, client)
    asyncio.run(run())


def test_full_queue_is_503_with_retry_after_then_serves():
    async def test(app, client):
        r = await client.post("/v1/completions", json={"prompt": "full"})
        body = await r.json()
        assert r.status == 503 and r.headers["Retry-After"] == "1" and body["error"]["code"] == "queue_full"
        r = await client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2})
        assert r.status == 200 and (await r.json())["choices"][0]["text"] == "xx"
    _in_process(test)


def test_engine_failure_is_500_for_that_request_only():
    async def test(app, client):
        r = await client.post("/v1/completions", json={"prompt": "boom"})
        assert r.status == 500 and (await r.json())["error"]["type"] == "server_error"
        r = await client.post("/v1/completions", json={"prompt": "boom", "stream": True})
        events = sse.parse(await r.read())  # headers were sent: the error arrives in-band, then [DONE]
        assert orjson.loads(events[0])["error"]["code"] == "internal_error" and events[-1] == b"[DONE]"
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "ok"}],
                                                            "max_tokens": 3})
        assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"] == "xxx"
    _in_process(test)


def test_chat_prompt_is_the_templates_own_token_ids():
    """The chat template places the special tokens; the engine gets its token ids, so nothing is added to
    them (a template that writes BOS would otherwise get a second one)."""
    async def test(app, client):
        messages = [{"role": "user", "content": "hi there"}]
        r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
        engine = app[STATE].engine
        assert r.status == 200 and engine.prompts[-1] == engine.tokenizer.encode_chat(messages)
    _in_process(test)


def test_step_trace_endpoint_is_404_when_tracing_is_off():
    async def test(app, client):
        r = await client.get("/debug/steps")
        assert r.status == 404
        assert "--step-trace" in (await r.json())["error"]["message"]
    _in_process(test)


def test_one_access_log_line_per_request(caplog):
    async def test(app, client):
        with caplog.at_level(logging.INFO, logger="distserve.access"):
            assert (await client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 3})).status == 200
            assert (await client.post("/v1/completions", json={"prompt": "ok", "temperature": 9})).status == 400
            assert (await client.get("/health")).status == 200  # polling endpoints: DEBUG only
        lines = [r.getMessage() for r in caplog.records if r.name == "distserve.access"]
        assert len(lines) == 2, lines
        assert re.match(r'127\.0\.0\.1 "POST /v1/completions" 200 \d+\.\d\ds prompt=2 completion=3 finish=length '
                        r"id=cmpl-\w+$", lines[0]), lines[0]
        assert '"POST /v1/completions" 400' in lines[1] and "error=\"'temperature' must be in [0.0, 2.0]" in lines[1]
    _in_process(test)


def test_models_retrieve_by_id():
    async def test(app, client):
        r = await client.get("/v1/models/fake")
        assert r.status == 200 and (await r.json())["id"] == "fake"
        r = await client.get("/v1/models/org/other")
        assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"
    _in_process(test)


def test_unknown_fields_warn_once_by_default_and_are_refused_under_strict_params(caplog):
    body = {"prompt": "ok", "max_tokens": 1, "frobnicate": 1}

    async def lenient(app, client):
        with caplog.at_level(logging.WARNING, logger="distserve.server"):
            for _ in range(2):
                assert (await client.post("/v1/completions", json=body)).status == 200
        warned = [r.getMessage() for r in caplog.records if "frobnicate" in r.getMessage()]
        assert len(warned) == 1 and "--strict-params" in warned[0]  # once, not per request

    async def strict(app, client):
        r = await client.post("/v1/completions", json=body)
        err = (await r.json())["error"]
        assert r.status == 400 and (err["param"], err["code"]) == ("frobnicate", "unknown_parameter")
    _in_process(lenient)
    _in_process(strict, strict_params=True)


def test_server_default_sampling_applies_where_the_request_sets_none():
    async def test(app, client):
        await client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1})
        await client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1, "temperature": 1.0})
        p = app[STATE].engine.params
        assert [(x.temperature, x.top_p) for x in p] == [(0.2, 0.9), (1.0, 0.9)]
    _in_process(test, default_sampling={"temperature": 0.2, "top_p": 0.9})


PAYLOADS = orjson.loads(open(os.path.join(ROOT, "tests", "data", "client_payloads.json"), "rb").read())
GUIDELLM = [(path, body) for client, bodies in PAYLOADS.items() if client.startswith("guidellm")
            for path, body in bodies.items()]


@pytest.mark.parametrize("path, body", GUIDELLM, ids=[p for p, _ in GUIDELLM])
def test_guidellm_bodies_stream_with_usage_on_every_chunk(path, body):
    """The exact bodies guidellm 0.8 sends (it got 400 for all of them before): 200, and vLLM's
    continuous_usage_stats: each chunk's usage counts the tokens so far, then the usage chunk, then [DONE]."""
    async def test(app, client):
        r = await client.post(path, json={**body, "model": "fake"})
        assert r.status == 200, await r.text()
        events = sse.parse(await r.read())
        chunks = [orjson.loads(e) for e in events[:-1]]
        assert events[-1] == b"[DONE]" and chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
        with_tokens = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
        assert with_tokens[-4:] == [1, 2, 3, 4]
    _in_process(test)


def test_busy_port_is_one_line_before_the_model_loads():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "server.py", "--port", str(port)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"error: cannot listen on 127.0.0.1:{port}: the address is already in use (another "
                                "server?); stop it, or choose another --port (--port 0 picks a free one)")
    assert "loading" not in r.stdout  # it failed before the model load


def test_drain_aborts_what_outlives_the_grace_period():
    async def test(app, client):
        st = app[STATE]
        task = asyncio.create_task(client.post("/v1/completions", json={"prompt": "slow"}))
        while not st.live:
            await asyncio.sleep(0.01)
        assert (await health(make_mocked_request("GET", "/health", app=app))).status == 200
        drained = asyncio.create_task(drain(app, client.server.runner))
        await asyncio.sleep(0.05)
        assert (await health(make_mocked_request("GET", "/health", app=app))).status == 503  # draining
        r = await task
        assert r.status == 503 and (await r.json())["error"]["code"] == "aborted"
        await drained
        assert not st.live and st.engine.aborted
    _in_process(test, grace_period=0.3)


# ================= a real server on the default model =================
class Server(ServerProcess):
    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    flags = ["--mode", "disagg", "--dtype", "float32", "--kv-cache-memory", "96MiB", "--max-body-bytes", "64KiB",
             "--grace-period", "60", "--step-trace", "100000"]
    # the key comes from the environment, as users are told to pass it
    with Server(flags, tmp_path_factory.mktemp("server") / "server.log", env={"API_KEY": KEY},
                startup_timeout=240) as srv:
        yield srv


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None,
         key: str | None = KEY) -> tuple[int, dict, bytes]:
    data = orjson.dumps(body) if isinstance(body, dict | list) else body
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    hdrs = {"Content-Type": "application/json", **auth, **(headers or {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, hdrs, method=method), timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except OSError:
        return 0, {}, b""


def scrape(srv: Server) -> dict[str, float]:
    """Metric samples, keyed by the sample's line up to the value."""
    text = http("GET", srv.url + "/metrics")[2].decode()
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in text.splitlines() if ln and ln[0] != "#")}


def kv_used(srv: Server) -> list[float]:
    m = scrape(srv)
    return [v for k, v in m.items() if k.startswith(("distserve_kv_blocks_used", "distserve_running_requests"))]


def wait_idle(srv: Server, timeout: float) -> float:
    t0 = time.monotonic()
    while any(kv_used(srv)):
        assert time.monotonic() - t0 < timeout, f"KV blocks still used: {scrape(srv)}"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_banner_models_and_health(server):
    banner = open(server.log).read()
    assert f"listening on {server.url}" in banner and "SmolLM2" in banner
    assert re.search(r"prefill0: prefill on cpu\S*", banner) and re.search(r"decode1: decode on cpu\S*", banner)
    models = server.client().models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert server.client().models.retrieve("SmolLM2-135M-Instruct").id == "SmolLM2-135M-Instruct"
    assert "default sampling: temperature 0.2, top_p 0.9 (the bundled model's card)" in banner
    assert http("GET", server.url + "/health", key=None)[0] == 200


def test_openai_client_completions_and_chat(server):
    c = server.client()
    r = c.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert (r.usage.completion_tokens, r.usage.total_tokens) == (8, r.usage.prompt_tokens + 8)
    parts = [ch.choices[0].text for ch in c.completions.create(model=r.model, prompt=PROMPTS[0], max_tokens=8,
                                                              temperature=0, stream=True,
                                                              extra_body={"ignore_eos": True})]
    assert "".join(parts) == r.choices[0].text

    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    chat = c.chat.completions.create(model=r.model, messages=msgs, max_completion_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage.completion_tokens <= 8
    stream = c.chat.completions.create(model=r.model, messages=msgs, max_completion_tokens=8, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == chat.usage.total_tokens


def test_readme_chat_example_gives_sensible_text_at_the_default_sampling(server, capsys):
    """The README's client snippet, as written (only the address and key differ): the bundled model's own
    recommended sampling applies, where OpenAI's temperature 1.0 gave garbled text."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "from openai import OpenAI" in b)
    assert "temperature" not in snippet  # the point: the server's default
    exec(snippet.replace("http://127.0.0.1:8000/v1", server.url + "/v1").replace('"unused"', repr(KEY)), {})
    assert capsys.readouterr().out.startswith("Hello! How can I")


def test_n_seeds_and_logprobs(server):
    c = server.client()
    r = c.completions.create(model="SmolLM2-135M-Instruct", prompt=["Hi", "Yo"], max_tokens=4, n=2, temperature=1,
                             seed=3, logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2, 3] and r.usage.completion_tokens == 16
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4 and all(len(t) <= 2 for t in lp.top_logprobs)
    again = c.completions.create(model=r.model, prompt=["Hi", "Yo"], max_tokens=4, n=2, temperature=1, seed=3,
                                 extra_body={"ignore_eos": True})
    assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices]  # seeded: reproducible
    chat = c.chat.completions.create(model=r.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                     logprobs=True, top_logprobs=2, temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and len(content[0].top_logprobs) == 2


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 4}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
])
def test_sse_framing_done_and_usage_chunk_byte_by_byte(server, path, body):
    status, headers, raw = http("POST", server.url + path, {**body, "stream": True, "temperature": 0,
                                                           "stream_options": {"include_usage": True}})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse.parse(raw)  # strict: every event is exactly b"data: <json>\n\n"
    assert raw.endswith(b"\n\ndata: [DONE]\n\n") and events[-1] == b"[DONE]" and raw.count(b"[DONE]") == 1
    chunks = [orjson.loads(e) for e in events[:-1]]
    *body_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 4
    assert all(ch["usage"] is None and len(ch["choices"]) == 1 for ch in body_chunks)
    assert body_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len({ch["id"] for ch in chunks}) == 1


def test_64_concurrent_streams_match_offline_greedy(server):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(64)]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=8,
                                                 temperature=0, stream=True)
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    async def all_streams() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    texts = asyncio.run(all_streams())
    wait_idle(server, timeout=10)  # every KV block back, nothing running

    from serving.llm import LLM
    with LLM(mode="colocated", dtype="float32", num_kv_blocks=256) as llm:
        want = [o.text for o in llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0))]
    assert texts == want


BAD = [  # (method, path, body, extra headers, key, status, code, param)
    ("POST", "/v1/completions", b"{not json", {}, KEY, 400, "invalid_json", None),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": "hot"}, {}, KEY, 400, "invalid_type", "temperature"),
    ("POST", "/v1/completions", {"prompt": ""}, {}, KEY, 400, None, "prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 0}, {}, KEY, 400, None, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": -5}, {}, KEY, 400, None, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 8192}, {}, KEY, 400, "context_length_exceeded",
     "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "echo": True}, {}, KEY, 400, "unsupported_parameter", "echo"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, {}, KEY, 400, None, "messages"),
    ("POST", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, {}, KEY, 404, "model_not_found", "model"),
    ("POST", "/v1/completions", {"prompt": "x"}, {}, None, 401, "invalid_api_key", None),
    ("POST", "/v1/chat/completions", {"prompt": "x"}, {}, "wrong", 401, "invalid_api_key", None),
    ("POST", "/v1/completions", {"prompt": "x" * 70_000}, {}, KEY, 413, "request_too_large", None),
    ("GET", "/v1/nope", None, {}, KEY, 404, "not_found", None),
    ("GET", "/v1/completions", None, {}, KEY, 405, "method_not_allowed", None),
]


@pytest.mark.parametrize("method, path, body, headers, key, status, code, param", BAD,
                         ids=[f"{b[5]}-{b[6] or b[7]}" for b in BAD])
def test_bad_input_gets_its_status_and_error_body_then_server_serves(server, method, path, body, headers, key,
                                                                      status, code, param):
    got, _, raw = http(method, server.url + path, body, headers, key)
    assert got == status, raw
    err = orjson.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["code"], err["param"]) == (code, param) if code else err["param"] == param
    ok = http("POST", server.url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert ok[0] == 200


def test_openai_client_raises_typed_errors(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="best_of"):
        c.completions.create(model="SmolLM2-135M-Instruct", prompt="x", best_of=3)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="bad", max_retries=0).models.list()


def test_dropped_stream_frees_its_blocks(server):
    async def drop() -> None:
        async with ClientSession(timeout=ClientTimeout(total=60)) as s:
            resp = await s.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                                json={"prompt": "Tell me a long story.", "max_tokens": 1000, "ignore_eos": True,
                                      "stream": True})
            assert resp.status == 200
            assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")
            assert any(kv_used(server))  # generating: it holds KV
            resp.connection.transport.abort()  # hang up mid-stream
            resp.release()

    before = scrape(server).get('distserve_request_finish_total{reason="abort"}', 0.0)
    asyncio.run(drop())
    took = wait_idle(server, timeout=5)  # 1000 tokens would take far longer: freed by the abort, not by finishing
    assert took < 5 and scrape(server)['distserve_request_finish_total{reason="abort"}'] == before + 1


def test_metrics_cover_latencies_tokens_and_statuses(server):
    assert http("POST", server.url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200
    assert http("POST", server.url + "/v1/completions", {"prompt": "Hi", "max_tokens": 0})[0] == 400
    m = scrape(server)
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
                 "queueing_seconds", "kv_transfer_seconds"):
        assert m[f"distserve_{name}_count"] > 0, name
    assert m["distserve_prompt_tokens_total"] > 0 and m["distserve_generation_tokens_total"] > 0
    assert m['distserve_requests_total{endpoint="/v1/completions",status="200"}'] > 0
    assert m['distserve_requests_total{endpoint="/v1/completions",status="400"}'] > 0
    assert sum(v for k, v in m.items() if k.startswith("distserve_kv_blocks_total")) > 0


def test_step_trace_endpoint_drains_the_steps_it_returns(server):
    assert http("GET", server.url + "/debug/steps", key=None)[0] == 401  # behind the API key like /v1/*
    wait_idle(server, 30)
    http("GET", server.url + "/debug/steps")
    server.client().completions.create(model="SmolLM2-135M-Instruct", prompt=[5, 6, 7, 8, 9], max_tokens=4,
                                       temperature=0, extra_body={"ignore_eos": True})
    wait_idle(server, 30)
    status, _, body = http("GET", server.url + "/debug/steps")
    steps = orjson.loads(body)["steps"]
    assert status == 200
    assert [r["prefill"] for r in steps if r["role"] == "prefill"] == [[[5, 0]]]
    assert [r["decode_batch"] for r in steps if r["role"] == "decode"] == [1, 1, 1]
    assert orjson.loads(http("GET", server.url + "/debug/steps")[2])["steps"] == []


def test_sigterm_drains_in_flight_then_exits_zero(server):  # last: it stops the module's server
    result = {}
    req = threading.Thread(target=lambda: result.update(r=http("POST", server.url + "/v1/completions", {
        "prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True, "temperature": 0})))
    req.start()
    while not any(kv_used(server)):
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0
    req.join()
    status, _, raw = result["r"]
    assert status == 200 and orjson.loads(raw)["usage"]["completion_tokens"] == 48  # finished, not cut off
    assert http("GET", server.url + "/health")[0] == 0  # no longer listening
