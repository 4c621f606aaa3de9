"""The generation endpoints: parse, submit n engine requests per prompt, answer in full or as an SSE stream.

Every engine request a handler submits is aborted when the handler ends for any reason (finished: no-op;
client gone, handler cancelled, write failed: its KV blocks are freed), so nothing outlives its client.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import orjson
from aiohttp import web

from serving import sse
from serving.access_log import ACCESS
from serving.api import EngineUnavailableError, QueueFullError, RequestOutput
from serving.errors import ApiError, bad
from serving.protocol import GenerateRequest, parse_chat, parse_completion
from serving.responses import Choice, choice_usage
from serving.state import STATE, State, unavailable

log = logging.getLogger("distserve.server")


async def read_json(request: web.Request, limit: int) -> object:
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body exceeds {limit} bytes", code="request_too_large") from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise bad(f"malformed JSON body: {e}", code="invalid_json") from None



def _submit(st: State, req: GenerateRequest, rid: str) -> list[AsyncIterator[RequestOutput]]:
    """One engine request per (prompt, choice); all or none are admitted."""
    streams: list[AsyncIterator[RequestOutput]] = []
    try:
        for prompt in req.prompts:
            for j in range(req.n):
                eid = f"{rid}-{len(streams)}"
                streams.append(st.engine.add_request(prompt, req.choice_params(j), eid))
                st.live.add(eid)
    except (ValueError, QueueFullError, EngineUnavailableError) as e:
        for k in range(len(streams)):
            st.engine.abort(f"{rid}-{k}")
            st.live.discard(f"{rid}-{k}")
        if isinstance(e, QueueFullError):
            raise unavailable(f"server busy: {e}; retry later", st, "queue_full") from None
        if isinstance(e, EngineUnavailableError):
            raise unavailable(f"engine unavailable: {e}", st, "engine_unavailable") from None
        msg = str(e)
        param = "messages" if req.endpoint == "chat" else "prompt"
        code = "context_length_exceeded" if "exceeds" in msg else None
        raise bad(msg, "max_tokens" if code and req.params.max_tokens else param, code) from None
    st.metrics.started.inc(len(streams))
    return streams


def _cut_short(st: State, out: RequestOutput) -> ApiError | None:
    """The error a client gets for a request that ended without its result: 503 if aborted (shutdown, or
    the client fell too far behind its stream), 500 if an engine instance failed."""
    if out.finish_reason == "abort":
        return unavailable(f"request aborted: {out.error or 'the server is shutting down'}", st, "aborted")
    if out.finish_reason == "error":
        return ApiError(500, out.error or "engine error", "server_error", None, "engine_error")
    return None


async def _merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) from every stream as they come, one read ahead per stream at most (a slow
    consumer leaves the engine's streams unread, so they merge their updates and stay bounded). Closing
    this closes them all (-> engine abort)."""
    if len(streams) == 1:  # the common case, without a task per stream
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
        return
    reads = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while reads:
            done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
            for read in done:
                i = reads.pop(read)
                out = read.result()  # a failed stream raises here, to the handler
                if not out.finished:
                    reads[asyncio.ensure_future(anext(streams[i]))] = i
                yield i, out
    finally:
        for read in reads:
            read.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
        for s in streams:
            await s.aclose()


def _update(st: State, c: Choice, out: RequestOutput) -> None:
    c.text += out.new_text
    c.num_tokens, c.prompt_tokens = out.num_tokens, len(out.prompt_token_ids)
    if out.finished:
        c.finish_reason = out.finish_reason
        c.metrics = out.metrics
        _observe(st, out.metrics, out.finish_reason, c.prompt_tokens, c.num_tokens)


def _observe(st: State, m, reason: str, prompt_tokens: int, output_tokens: int) -> None:
    st.metrics.observe_finished(m, reason, prompt_tokens, output_tokens)
    st.window.observe(m, reason, output_tokens)


def _warn_ignored(st: State, names: list[str]) -> None:
    """Unknown fields are ignored (vLLM's behaviour); each name is logged once, not on every request."""
    new = [n for n in names if n not in st.warned_fields]
    if new and len(st.warned_fields) < 1000:  # bounded: a client inventing names cannot grow it forever
        st.warned_fields.update(new)
        log.warning("ignored unknown request fields: %s (logged once each; --strict-params refuses them)",
                    ", ".join(new))


async def _generate(request: web.Request, endpoint: str) -> web.StreamResponse:
    st = request.app[STATE]
    if st.phase != "ready":
        raise unavailable(f"server is {st.phase}", st, "unavailable")
    body = await read_json(request, st.config.max_body_bytes)
    strict, defaults = st.config.strict_params, st.config.default_sampling
    if endpoint == "completions":
        req = parse_completion(body, strict, defaults)
    else:
        req = parse_chat(body, st.engine.tokenizer.apply_chat_template, strict, defaults)
        # the template placed every special token: tokenized without adding any (a BOS it wrote is not doubled)
        req.prompts = [st.engine.tokenizer.encode(p, add_special_tokens=False) for p in req.prompts]
    _warn_ignored(st, req.ignored)
    if req.model is not None and req.model not in (st.model, st.engine.model_name):
        raise ApiError(404, f"model '{req.model}' does not exist; this server serves '{st.model}'",
                       param="model", code="model_not_found")
    rid = ("cmpl-" if endpoint == "completions" else "chatcmpl-") + uuid.uuid4().hex
    streams = _submit(st, req, rid)
    st.window.arrived()
    st.handlers += 1
    st.idle.clear()
    choices = [Choice(i) for i in range(len(streams))]
    request[ACCESS] = {"id": rid, "choices": choices, "prompts": len(req.prompts)}  # what the access log line reports
    try:
        if req.stream:
            return await _stream(request, st, req, rid, streams, choices)
        async with aclosing(_merged(streams)) as merged:
            async for i, out in merged:
                _update(st, choices[i], out)
                if (err := _cut_short(st, out)) is not None:
                    raise err
                if req.logprobs is not None:
                    choices[i].logprobs.extend(out.new_logprobs)
        build = st.formatter.completion_response if endpoint == "completions" else st.formatter.chat_response
        resp = build(rid, int(time.time()), choices, len(req.prompts), req.logprobs is not None)
        return web.Response(body=orjson.dumps(resp), content_type="application/json")
    finally:
        for k, c in enumerate(choices):  # no-op for finished requests; frees the KV of any other
            st.engine.abort(f"{rid}-{k}")
            st.live.discard(f"{rid}-{k}")
            if c.finish_reason is None:  # the client left: its final output is never read, count it here
                _observe(st, None, "abort", c.prompt_tokens, c.num_tokens)
        st.handlers -= 1
        if not st.handlers:
            st.idle.set()


async def _stream(request: web.Request, st: State, req: GenerateRequest, rid: str,
                  streams: list[AsyncIterator[RequestOutput]], choices: list[Choice]) -> web.StreamResponse:
    chat = req.endpoint == "chat"
    chunk = st.formatter.chat_chunk if chat else st.formatter.completion_chunk
    created, usage = int(time.time()), req.include_usage
    # vLLM's continuous_usage_stats: every chunk carries its choice's usage so far, not null
    so_far = (lambda c: choice_usage(c)) if req.continuous_usage else (lambda c: None)  # noqa: E731
    resp = web.StreamResponse(headers=sse.HEADERS)
    await resp.prepare(request)
    merged = _merged(streams)
    try:
        if chat:  # OpenAI opens every choice with a role delta
            await resp.write(b"".join(sse.event(chunk(rid, created, c, "", None, None, usage, so_far(c)))
                                      for c in choices))
        async for i, out in merged:
            c = choices[i]
            _update(st, c, out)
            if (err := _cut_short(st, out)) is not None:
                await resp.write(sse.event(err.body()) + sse.DONE)
                return resp
            entries = out.new_logprobs if req.logprobs is not None else None
            if out.new_text or entries or out.finished:
                await resp.write(sse.event(chunk(rid, created, c, out.new_text, entries, out.finish_reason, usage,
                                                 so_far(c))))
        if usage:
            obj = "chat.completion.chunk" if chat else "text_completion"
            await resp.write(sse.event(st.formatter.usage_chunk(rid, created, obj, choices, len(req.prompts))))
        await resp.write(sse.DONE)
    except ConnectionResetError:  # the client hung up: the finally in _generate aborts its requests
        log.debug("client disconnected from %s", rid)
    except Exception:  # headers are sent: report in-band, the error must not reach other requests
        log.exception("stream %s failed", rid)
        err = ApiError(500, "internal server error", "server_error", None, "internal_error")
        try:
            await resp.write(sse.event(err.body()) + sse.DONE)
        except ConnectionResetError:
            pass
    finally:
        await merged.aclose()
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completions")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")

