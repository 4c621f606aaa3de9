"""Open-loop load runner: streams OpenAI-style completions over SSE and times every token at the client.

Each request is sent at its scheduled offset whether or not earlier ones have finished (open loop,
as in DistServe), so queueing in the server shows up as TTFT. A failed, refused or timed-out
request becomes a MeasuredRequest with finished=False and its error text; nothing raises out of a run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

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
        async for raw in resp.content:  # one SSE line per iteration
            now = time.perf_counter() - t0
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments (":"), event names
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            data = orjson.loads(payload)
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


async def _one(session, spec, cfg, index, send_time, t0, sem) -> MeasuredRequest:
    r = MeasuredRequest(index=index, prompt_len=spec.prompt_len, output_len=spec.output_len, send_time=send_time)
    delay = send_time - (time.perf_counter() - t0)
    if delay > 0:
        await asyncio.sleep(delay)
    if sem is not None:
        await sem.acquire()
    r.start = time.perf_counter() - t0
    try:
        async with asyncio.timeout(cfg.request_timeout):
            await _stream(session, spec, cfg, r, t0)
    except TimeoutError:
        r.error = f"timeout after {cfg.request_timeout:g}s"
    except Exception as e:  # refused, reset, bad JSON...: a miss, never a crash (CancelledError passes)
        r.error = f"{type(e).__name__}: {e}"[:300]
    finally:
        if sem is not None:
            sem.release()
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
    sink = [] if sink is None else sink
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), desc=desc or "requests", unit="req", leave=False)
    # limit=0: no cap on open connections, or the connector would queue requests and hide server queueing.
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        t0 = time.perf_counter()
        tasks = [
            asyncio.create_task(_one(session, s, cfg, i, st, t0, sem))
            for i, (s, st) in enumerate(zip(specs, send_times, strict=True))
        ]
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
    return sorted((t.result() for t in tasks), key=lambda r: r.index)
