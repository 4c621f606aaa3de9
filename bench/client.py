"""Open-loop load runner: streams OpenAI-style completions over SSE and times every token at the client.

Each request is sent at its scheduled offset whether or not earlier ones have finished (open loop,
as in DistServe), so queueing in the server shows up as TTFT. A failed, refused or timed-out
request becomes a MeasuredRequest with finished=False and its error text; nothing raises out of a run.

`run_calls` sends arbitrary generation requests the same way (`Call`: chat or completions, streamed or
not, a client that hangs up or never reads) and returns what each client saw (`Reply`); bench/soak.py
drives the server with it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp
import orjson

from bench.datasets import RequestSpec
from bench.metrics import MeasuredRequest
from scheduler.planner.results import tpot_of

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class ClientConfig:
    url: str  # server root, e.g. http://127.0.0.1:8000
    model: str = ""
    api_key: str | None = None
    request_timeout: float = 600.0  # seconds, whole request including the stream
    token_ids: bool = False  # completions: send the prompt as token ids (exact lengths; not every server takes them)
    max_concurrency: int | None = None  # None: pure open loop
    progress: bool = True
    endpoint: str = "completions"  # completions | chat (the prompt as one user message)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if self.request_timeout <= 0:
            raise ValueError("request_timeout must be > 0")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, got {self.endpoint!r}")
        if self.token_ids and self.endpoint == "chat":
            raise ValueError("token-id prompts need the completions endpoint (chat messages are text)")

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h


def request_body(spec: RequestSpec, cfg: ClientConfig) -> dict:
    """What every server we know takes (ours, vLLM, llama.cpp's llama-server, guidellm's mock): text by default."""
    body: dict = {"model": cfg.model}
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt_text}]
    else:
        body["prompt"] = spec.prompt_ids if cfg.token_ids and spec.prompt_ids is not None else spec.prompt_text
    return {
        **body,
        "max_tokens": spec.output_len,
        "ignore_eos": True,  # the load must be exactly the dataset's output lengths (vLLM's extension)
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
    }


def _has_token(choice: dict, chat: bool) -> bool:
    """Whether a streamed choice carries output. Chat streams open with a role-only delta (no token yet)."""
    if chat:
        delta = choice.get("delta") or {}
        return bool(delta.get("content") or delta.get("reasoning_content"))
    # A completions chunk carries a token, except a bare terminator (no text, finish_reason set).
    return bool(choice.get("text") or choice.get("finish_reason") is None)


async def fetch_model_name(url: str, api_key: str | None = None, timeout: float = 10.0) -> str:
    """The first model the server lists at GET /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.get(f"{url.rstrip('/')}/v1/models", headers=headers) as resp:
            resp.raise_for_status()
            data = await resp.json(content_type=None)
    return data["data"][0]["id"]


async def sse_data(resp: aiohttp.ClientResponse) -> AsyncIterator[dict | None]:
    """The data objects of an SSE response as they arrive; None for the final [DONE]."""
    async for raw in resp.content:  # one SSE line per iteration
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments (":"), event names
        payload = line[5:].strip()
        if payload == b"[DONE]":
            yield None
            return
        yield orjson.loads(payload)


async def _stream(session: aiohttp.ClientSession, spec: RequestSpec, cfg: ClientConfig, r: MeasuredRequest,
                  t0: float) -> None:
    """Fills r from one streamed response; raises on transport errors (the caller records them)."""
    token_times: list[float] = []
    usage_tokens: int | None = None
    chat = cfg.endpoint == "chat"
    url = cfg.url + ENDPOINTS[cfg.endpoint]
    async with session.post(url, json=request_body(spec, cfg), headers=cfg.headers()) as resp:
        if resp.status != 200:
            body = (await resp.text())[:300]
            r.error = f"HTTP {resp.status}: {body}"
            return
        async for data in sse_data(resp):
            now = time.perf_counter() - t0
            if data is None:
                break
            if "error" in data:
                r.error = f"server error: {str(data['error'])[:300]}"
                return
            if data.get("usage"):
                usage_tokens = data["usage"].get("completion_tokens", usage_tokens)
            choices = data.get("choices") or []
            if choices and _has_token(choices[0], chat):
                token_times.append(now)
    r.end = time.perf_counter() - t0
    if not token_times:
        r.error = "no tokens in response"
        return
    r.output_tokens = usage_tokens if usage_tokens is not None else len(token_times)
    r.ttft = token_times[0] - r.start
    r.tpot = tpot_of(token_times[0], token_times[-1], r.output_tokens)
    r.e2e = r.end - r.start
    r.itl = [b - a for a, b in zip(token_times, token_times[1:], strict=False)]
    r.finished = True


async def _one(session: aiohttp.ClientSession, spec: RequestSpec, cfg: ClientConfig, index: int, send_time: float,
               t0: float) -> MeasuredRequest:
    r = MeasuredRequest(index=index, prompt_len=spec.prompt_len, output_len=spec.output_len, send_time=send_time)
    r.start = time.perf_counter() - t0
    try:
        async with asyncio.timeout(cfg.request_timeout):
            await _stream(session, spec, cfg, r, t0)
    except TimeoutError:
        r.error = f"timeout after {cfg.request_timeout:g}s"
    except Exception as e:  # refused, reset, bad JSON...: a miss, never a crash (CancelledError passes)
        r.error = f"{type(e).__name__}: {e}"[:300]
    if not r.finished:
        r.end = time.perf_counter() - t0
    return r


async def run_load(
    specs: list[RequestSpec],
    send_times: list[float],
    cfg: ClientConfig,
    sink: list[MeasuredRequest] | None = None,
    desc: str = "",
) -> list[MeasuredRequest]:
    """Sends specs[i] at send_times[i] seconds after the start; returns results in request order.

    Finished results are also appended to `sink` as they complete, so a caller that is cancelled
    (Ctrl-C) still holds what was measured; on cancellation the requests in flight are cancelled
    and the CancelledError propagates.
    """
    if len(specs) != len(send_times):
        raise ValueError(f"{len(specs)} requests but {len(send_times)} send times")
    return await _open_loop(send_times, cfg, lambda s, i, t0: _one(s, specs[i], cfg, i, send_times[i], t0),
                            sink, desc)


R = TypeVar("R")


async def _open_loop(send_times: list[float], cfg: ClientConfig,
                     one: Callable[[aiohttp.ClientSession, int, float], Awaitable[R]],
                     sink: list[R] | None, desc: str) -> list[R]:
    """Runs one(session, i, t0) at send_times[i] seconds after t0 (at most cfg.max_concurrency at once);
    results in order, and into `sink` as they complete."""
    sink = [] if sink is None else sink
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(send_times), desc=desc or "requests", unit="req", leave=False)
    # limit=0: no cap on open connections, or the connector would queue requests and hide server queueing.
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        t0 = time.perf_counter()

        async def timed(i: int) -> R:
            delay = send_times[i] - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                return await one(session, i, t0)
            async with sem:
                return await one(session, i, t0)

        tasks = [asyncio.create_task(timed(i)) for i in range(len(send_times))]
        try:
            for fut in asyncio.as_completed(tasks):
                sink.append(await fut)
                if bar is not None:
                    bar.update(1)
        finally:
            for t in tasks:
                t.cancel()
            # Let cancelled requests unwind before the session closes their connections.
            await asyncio.gather(*tasks, return_exceptions=True)
            if bar is not None:
                bar.close()
    return [t.result() for t in tasks]


# ---- arbitrary calls: what the soak sends ----
@dataclass
class Call:
    """One generation request and how its client behaves."""

    path: str  # /v1/completions | /v1/chat/completions
    body: dict  # the JSON body; body["stream"] says whether the answer is an SSE stream
    hang_up_after: int | None = None  # streams: close the connection after reading this many events
    stall: float = 0.0  # streams: seconds to leave the answer unread first (0 events after it: never read)


@dataclass
class Reply:
    """What the client saw. texts/finish by choice index; error: an error status's body, an in-band error
    event, a missing [DONE] or a transport error."""

    status: int = 0
    texts: dict[int, str] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    error: str = ""
    retry_after: str | None = None
    events: int = 0  # SSE data events read (streams)
    hung_up: bool = False  # the client closed the connection on purpose
    start: float = 0.0  # offsets from the run's start, seconds
    first: float | None = None  # first event carrying text (streams) or the answer (non-streaming)
    end: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


def _choice_text(choice: dict) -> str:
    """Completions text, a chat message's content, or a chat delta's content."""
    if "text" in choice:
        return choice["text"] or ""
    part = choice.get("message") or choice.get("delta") or {}
    return part.get("content") or ""


async def send(session: aiohttp.ClientSession, cfg: ClientConfig, call: Call, t0: float) -> Reply:
    """One call; never raises (but CancelledError)."""
    r = Reply(start=time.perf_counter() - t0)
    try:
        async with asyncio.timeout(cfg.request_timeout):
            await _exchange(session, cfg, call, r, t0)
    except TimeoutError:
        r.error = f"timeout after {cfg.request_timeout:g}s"
    except Exception as e:  # refused, reset, bad JSON...
        r.error = f"{type(e).__name__}: {e}"[:300]
    r.end = time.perf_counter() - t0
    return r


async def _exchange(session: aiohttp.ClientSession, cfg: ClientConfig, call: Call, r: Reply, t0: float) -> None:
    async with session.post(cfg.url + call.path, json=call.body, headers=cfg.headers()) as resp:
        r.status, r.retry_after = resp.status, resp.headers.get("Retry-After")
        if resp.status != 200:
            r.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
            return
        if not call.body.get("stream"):
            data = orjson.loads(await resp.read())
            r.first = time.perf_counter() - t0
            for c in data["choices"]:
                r.texts[c["index"]], r.finish[c["index"]] = _choice_text(c), c.get("finish_reason")
            return
        if call.stall:
            await asyncio.sleep(call.stall)
        events = sse_data(resp)
        while call.hang_up_after is None or r.events < call.hang_up_after:
            data = await anext(events, False)
            if data is None:  # [DONE]
                return
            if data is False:
                r.error = r.error or "stream ended without [DONE]"
                return
            r.events += 1
            if "error" in data:
                r.error = f"server error: {str(data['error'])[:300]}"
            for c in data.get("choices") or []:
                text = _choice_text(c)
                if text and r.first is None:
                    r.first = time.perf_counter() - t0
                r.texts[c["index"]] = r.texts.get(c["index"], "") + text
                r.finish[c["index"]] = c.get("finish_reason") or r.finish.get(c["index"])
        r.hung_up = True
        resp.close()


async def run_calls(calls: list[Call], send_times: list[float], cfg: ClientConfig,
                    sink: list[Reply] | None = None, desc: str = "") -> list[Reply]:
    """Sends calls[i] at send_times[i] seconds after the start; replies in order (and into `sink` as they
    complete)."""
    if len(calls) != len(send_times):
        raise ValueError(f"{len(calls)} calls but {len(send_times)} send times")
    return await _open_loop(send_times, cfg, lambda s, i, t0: send(s, cfg, calls[i], t0), sink, desc)
