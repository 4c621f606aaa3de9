"""The HTTP front door: an OpenAI-compatible API over the AsyncEngine (aiohttp on uvloop, orjson).

    python server.py [--model PATH] [--mode disagg|colocated] [--port 8000] ...   (see --help)

POST /v1/completions, POST /v1/chat/completions (stream: true -> SSE), GET /v1/models, GET /health,
GET /metrics (serving/metrics.py lists the series). Request parsing lives in serving/protocol.py,
response shapes in serving/responses.py. This file knows nothing about blocks or devices.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from engine.config import CacheConfig, EngineConfig, SchedulerConfig, parse_size
from engine.engine import AsyncEngine, QueueFullError, RequestOutput
from serving import sse
from serving.metrics import CONTENT_TYPE, ServerMetrics
from serving.plan import PlanError, load_plan
from serving.protocol import ApiError, GenerateRequest, bad, parse_chat, parse_completion
from serving.responses import Choice, Formatter

log = logging.getLogger("distserve.server")
API_KEY_ENV = "API_KEY"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    api_key: str | None = None  # None: no authentication
    served_model_name: str | None = None  # None: the engine's model name
    max_body_bytes: int | str = "1MiB"
    grace_period: float = 30.0  # seconds in-flight requests get to finish on SIGINT/SIGTERM
    retry_after: int = 1  # seconds, on 503 (queue full, not ready, draining)

    def __post_init__(self) -> None:
        self.max_body_bytes = parse_size(self.max_body_bytes)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes <= 0 or self.grace_period < 0 or self.retry_after < 0:
            raise ValueError("max_body_bytes must be positive; grace_period and retry_after non-negative")


@dataclass
class State:
    """Everything the handlers share, stored on the app (no module globals)."""

    engine: AsyncEngine
    config: ServerConfig
    model: str
    formatter: Formatter
    metrics: ServerMetrics
    phase: str = "starting"  # starting -> ready -> draining
    live: set[str] = field(default_factory=set)  # engine request ids in flight
    handlers: int = 0  # generation handlers running
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    created: int = field(default_factory=lambda: int(time.time()))


STATE = web.AppKey("state", State)
_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}


def _error(e: ApiError) -> web.Response:
    return web.Response(body=orjson.dumps(e.body()), status=e.status, content_type="application/json",
                        headers=e.headers)


def _unavailable(message: str, st: State, code: str) -> ApiError:
    return ApiError(503, message, "server_error", None, code, {"Retry-After": str(st.config.retry_after)})


@web.middleware
async def _middleware(request: web.Request, handler) -> web.StreamResponse:
    """Auth, OpenAI error bodies for every failure, and request counting. Nothing escapes as a crash."""
    st = request.app[STATE]
    resp: web.StreamResponse | None = None
    status = 500
    try:
        key = st.config.api_key
        if key and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                               "authentication_error", None, "invalid_api_key")
        resp = await handler(request)
    except ApiError as e:
        resp = _error(e)
    except web.HTTPException as e:  # router 404/405, aiohttp's own 413
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status)
        msg = f"request body exceeds {st.config.max_body_bytes} bytes" if e.status == 413 else e.reason
        resp = _error(ApiError(e.status, msg, "invalid_request_error", None, code))
    except asyncio.CancelledError:
        status = 499  # the client went away (nginx's code for it)
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        resp = _error(ApiError(500, "internal server error", "server_error", None, "internal_error"))
    finally:
        endpoint = request.path if request.path in _ENDPOINTS else "other"
        st.metrics.requests.labels(endpoint, str(resp.status if resp is not None else status)).inc()
    return resp


async def _read_json(request: web.Request, limit: int) -> object:
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


# ---------------- generation ----------------
def _submit(st: State, req: GenerateRequest, rid: str) -> list[AsyncIterator[RequestOutput]]:
    """One engine request per (prompt, choice); all or none are admitted."""
    streams: list[AsyncIterator[RequestOutput]] = []
    try:
        for prompt in req.prompts:
            for j in range(req.n):
                eid = f"{rid}-{len(streams)}"
                streams.append(st.engine.add_request(prompt, req.choice_params(j), eid))
                st.live.add(eid)
    except (ValueError, QueueFullError) as e:
        for k in range(len(streams)):
            st.engine.abort(f"{rid}-{k}")
            st.live.discard(f"{rid}-{k}")
        if isinstance(e, QueueFullError):
            raise _unavailable(f"server busy: {e}; retry later", st, "queue_full") from None
        msg = str(e)
        param = "messages" if req.endpoint == "chat" else "prompt"
        code = "context_length_exceeded" if "exceeds" in msg else None
        raise bad(msg, "max_tokens" if code and req.params.max_tokens else param, code) from None
    return streams


async def _merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) from every stream as they come. Closing this closes them all (-> engine abort)."""
    if len(streams) == 1:  # the common case, without a task per stream
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in s:
                queue.put_nowait((i, out))
        except Exception as e:  # surfaced to the handler below
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, out = await queue.get()
            if isinstance(out, Exception):
                raise out
            left -= out.finished
            yield i, out
    finally:
        for t in tasks:
            t.cancel()


def _update(st: State, c: Choice, out: RequestOutput) -> None:
    c.text, c.num_tokens, c.prompt_tokens = out.text, len(out.token_ids), len(out.prompt_token_ids)
    if out.finished:
        c.finish_reason = out.finish_reason
        st.metrics.observe_finished(out.metrics, out.finish_reason, c.prompt_tokens, c.num_tokens)


async def _generate(request: web.Request, endpoint: str) -> web.StreamResponse:
    st = request.app[STATE]
    if st.phase != "ready":
        raise _unavailable(f"server is {st.phase}", st, "unavailable")
    body = await _read_json(request, st.config.max_body_bytes)
    render = lambda msgs: st.engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)  # noqa: E731
    req = parse_completion(body) if endpoint == "completions" else parse_chat(body, render)
    if req.model is not None and req.model not in (st.model, st.engine.model_name):
        raise ApiError(404, f"model '{req.model}' does not exist; this server serves '{st.model}'",
                       param="model", code="model_not_found")
    rid = ("cmpl-" if endpoint == "completions" else "chatcmpl-") + uuid.uuid4().hex
    streams = _submit(st, req, rid)
    st.handlers += 1
    st.idle.clear()
    choices = [Choice(i) for i in range(len(streams))]
    try:
        if req.stream:
            return await _stream(request, st, req, rid, streams, choices)
        async for i, out in _merged(streams):
            _update(st, choices[i], out)
            if req.logprobs is not None:
                choices[i].logprobs.extend(out.new_logprobs)
        if any(c.finish_reason == "abort" for c in choices):
            raise _unavailable("request aborted: the server is shutting down", st, "aborted")
        build = st.formatter.completion_response if endpoint == "completions" else st.formatter.chat_response
        resp = build(rid, int(time.time()), choices, len(req.prompts), req.logprobs is not None)
        return web.Response(body=orjson.dumps(resp), content_type="application/json")
    finally:
        for k, c in enumerate(choices):  # no-op for finished requests; frees the KV of any other
            st.engine.abort(f"{rid}-{k}")
            st.live.discard(f"{rid}-{k}")
            if c.finish_reason is None:  # the client left: its final output is never read, count it here
                st.metrics.observe_finished(None, "abort", c.prompt_tokens, c.num_tokens)
        st.handlers -= 1
        if not st.handlers:
            st.idle.set()


async def _stream(request: web.Request, st: State, req: GenerateRequest, rid: str,
                  streams: list[AsyncIterator[RequestOutput]], choices: list[Choice]) -> web.StreamResponse:
    chat = req.endpoint == "chat"
    chunk = st.formatter.chat_chunk if chat else st.formatter.completion_chunk
    created, usage = int(time.time()), req.include_usage
    resp = web.StreamResponse(headers=sse.HEADERS)
    await resp.prepare(request)
    merged = _merged(streams)
    try:
        if chat:  # OpenAI opens every choice with a role delta
            await resp.write(b"".join(sse.event(chunk(rid, created, c, "", None, None, usage)) for c in choices))
        async for i, out in merged:
            c = choices[i]
            _update(st, c, out)
            if out.finish_reason == "abort":
                err = _unavailable("request aborted: the server is shutting down", st, "aborted")
                await resp.write(sse.event(err.body()) + sse.DONE)
                return resp
            entries = out.new_logprobs if req.logprobs is not None else None
            if out.new_text or entries or out.finished:
                await resp.write(sse.event(chunk(rid, created, c, out.new_text, entries, out.finish_reason, usage)))
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


async def models(request: web.Request) -> web.Response:
    st = request.app[STATE]
    card = {"id": st.model, "object": "model", "created": st.created, "owned_by": "distserve",
            "max_model_len": st.engine.max_model_len}
    return web.Response(body=orjson.dumps({"object": "list", "data": [card]}), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    phase = request.app[STATE].phase
    return web.Response(body=orjson.dumps({"status": phase}), status=200 if phase == "ready" else 503,
                        content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[STATE].metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def create_app(engine: AsyncEngine, config: ServerConfig | None = None) -> web.Application:
    """The app around an engine; the engine starts with the app and shuts down with it."""
    config = config or ServerConfig()
    model = config.served_model_name or engine.model_name
    app = web.Application(middlewares=[_middleware], client_max_size=config.max_body_bytes)
    app[STATE] = State(engine, config, model, Formatter(engine.tokenizer, model), ServerMetrics(engine.stats))

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        st = app[STATE]
        await engine.start()
        st.phase = "ready"
        yield
        st.phase = "draining"
        await engine.shutdown()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


# ---------------- running it ----------------
async def drain(app: web.Application, runner: web.AppRunner) -> None:
    """Stop accepting, give in-flight requests the grace period, abort what is left, then shut down."""
    st = app[STATE]
    st.phase = "draining"  # /health -> 503; requests on open connections -> 503
    for site in list(runner.sites):
        await site.stop()
    if st.handlers:
        st.idle.clear()
        try:
            await asyncio.wait_for(st.idle.wait(), st.config.grace_period)
        except TimeoutError:
            log.warning("grace period over: aborting %d requests", len(st.live))
            for eid in list(st.live):
                st.engine.abort(eid)
            try:
                await asyncio.wait_for(st.idle.wait(), 5.0)
            except TimeoutError:
                pass
    await runner.cleanup()


async def serve(engine: AsyncEngine, config: ServerConfig) -> int:
    app = create_app(engine, config)
    verbose = log.isEnabledFor(logging.DEBUG)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=log if verbose else None, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    st = app[STATE]
    lines = [f"distserve listening on http://{host}:{port} (model {st.model}, {engine.config.mode}, "
             f"dtype {str(engine.dtype).removeprefix('torch.')}, max context {engine.max_model_len})"]
    lines += [f"  {s['instance']}: {s['role']} on {s['device']}, {s['kv_blocks_total']} KV blocks"
              for s in engine.stats()]
    print("\n".join(lines), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("distserve: shutting down (draining in-flight requests)", flush=True)
    await drain(app, runner)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="OpenAI-compatible server over the disaggregated engine.")
    a = p.add_argument
    a("--model", default=None, help="GGUF file or HF directory (default: the bundled SmolLM2 model)")
    a("--served-model-name", default=None, help="model name clients use (default: the checkpoint's name)")
    a("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    a("--port", type=int, default=8000, help="port (0: any free port)")
    a("--mode", choices=("disagg", "colocated"), default="disagg", help="prefill/decode layout (default: disagg)")
    a("--chunked-prefill", action="store_true", help="colocated only: Sarathi-style chunked prefill")
    a("--devices", nargs="+", default=None, help="colocated: one instance per device (default: cpu)")
    a("--prefill-devices", nargs="+", default=None, help="disagg: one prefill instance per device")
    a("--decode-devices", nargs="+", default=None, help="disagg: one decode instance per device")
    a("--dtype", choices=("auto", "bfloat16", "float32", "float16"), default="auto", help="weights and KV dtype")
    a("--max-num-seqs", type=int, default=64, help="running decodes per instance")
    a("--max-waiting", type=int, default=4096, help="admission queue bound; beyond it requests get 503")
    a("--kv-cache-memory", default="512MiB", help="KV cache budget per instance, e.g. 512MiB, 2GiB")
    a("--api-key", default=os.environ.get(API_KEY_ENV),
      help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}; unset: no auth)")
    a("--plan", default=None, help="placement plan JSON from the planner (overrides mode and devices)")
    a("--max-body-bytes", default="1MiB", help="largest accepted request body (413 beyond)")
    a("--grace-period", type=float, default=30.0, help="seconds to let in-flight requests finish on shutdown")
    a("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level")
    return p


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """Flags (and --plan) -> EngineConfig. ValueError/PlanError say what is wrong."""
    from engine.llm import default_disagg_devices

    layout: dict = {"mode": args.mode}
    if args.plan:
        layout = load_plan(args.plan)
    elif args.mode == "disagg":
        if args.chunked_prefill or args.devices:
            raise ValueError("--chunked-prefill and --devices apply to --mode colocated only")
        pre, dec = default_disagg_devices()
        layout.update(prefill_devices=args.prefill_devices or pre, decode_devices=args.decode_devices or dec)
    else:
        if args.prefill_devices or args.decode_devices:
            raise ValueError("--prefill-devices and --decode-devices apply to --mode disagg only")
        layout.update(devices=args.devices or ["cpu"], chunked_prefill=args.chunked_prefill)
    return EngineConfig(model=args.model, dtype=args.dtype, **layout,
                        cache=CacheConfig(memory_bytes=args.kv_cache_memory),
                        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        ecfg = engine_config(args)
        scfg = ServerConfig(host=args.host, port=args.port, api_key=args.api_key or None,
                            served_model_name=args.served_model_name, max_body_bytes=args.max_body_bytes,
                            grace_period=args.grace_period)
    except (PlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine = AsyncEngine(ecfg)  # loads the model before the loop starts
    import uvloop

    return uvloop.run(serve(engine, scfg))


if __name__ == "__main__":
    sys.exit(main())
