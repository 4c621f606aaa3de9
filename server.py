"""The HTTP front door: an OpenAI-compatible API over the AsyncEngine (aiohttp on uvloop, orjson).

    python server.py [--model PATH] [--mode disagg|colocated] [--port 8000] ...   (see --help)

POST /v1/completions, POST /v1/chat/completions (stream: true -> SSE), GET /v1/models[/{id}], GET /health,
GET /metrics (serving/metrics.py lists the series), GET /dashboard (live page; its data: GET /dashboard/data,
serving/dashboard.py), GET /debug/steps (with --step-trace: the recorded steps, drained; scheduler/runtime/trace.py).
The generation path is serving/generate.py (parsing in serving/protocol.py, response shapes in
serving/responses.py); one access-log line per request (serving/access_log.py). This file is the app, its
lifecycle and the CLI; it knows nothing about blocks or devices.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import orjson
from aiohttp import web

from engine.args import EngineArgs
from engine.config import EngineConfig
from serving import access_log, dashboard
from serving.api import EngineClient
from serving.engine import AsyncEngine
from serving.errors import ApiError
from serving.generate import chat_completions, completions
from serving.info import debug_steps, health, metrics, model_card, models
from serving.listen import bind_error, bind_socket
from serving.metrics import ServerMetrics
from serving.plan import PlanError, load_plan
from serving.responses import Formatter
from serving.state import STATE, ServerConfig, State

__all__ = ["STATE", "ServerConfig", "create_app", "drain", "main", "serve"]

log = logging.getLogger("distserve.server")
API_KEY_ENV = "API_KEY"


_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/debug/steps",
              "/dashboard", "/dashboard/data"}


def _error(e: ApiError) -> web.Response:
    return web.Response(body=orjson.dumps(e.body()), status=e.status, content_type="application/json",
                        headers=e.headers)




@web.middleware
async def _middleware(request: web.Request, handler) -> web.StreamResponse:
    """Auth, OpenAI error bodies for every failure, and request counting. Nothing escapes as a crash."""
    st = request.app[STATE]
    resp: web.StreamResponse | None = None
    status = 500
    error: str | None = None
    t0 = time.perf_counter()
    try:
        key = st.config.api_key
        if key and request.path.startswith(("/v1/", "/debug/")):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                               "authentication_error", None, "invalid_api_key")
        resp = await handler(request)
    except ApiError as e:
        resp, error = _error(e), e.message
    except web.HTTPException as e:  # router 404/405, aiohttp's own 413
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status)
        msg = f"request body exceeds {st.config.max_body_bytes} bytes" if e.status == 413 else e.reason
        resp, error = _error(ApiError(e.status, msg, "invalid_request_error", None, code)), msg
    except asyncio.CancelledError:
        status = 499  # the client went away (nginx's code for it)
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        resp, error = _error(ApiError(500, "internal server error", "server_error", None, "internal_error")), None
    finally:
        endpoint = request.path if request.path in _ENDPOINTS else "other"
        final = resp.status if resp is not None else status
        st.metrics.requests.labels(endpoint, str(final)).inc()
        access_log.record(request, final, time.perf_counter() - t0, error)
    return resp



def create_app(engine: EngineClient, config: ServerConfig | None = None) -> web.Application:
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
    app.router.add_get("/v1/models/{id:.+}", model_card)  # ids may hold slashes (org/name)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/debug/steps", debug_steps)
    page, data = dashboard.handlers(STATE)
    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard/data", data)
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


async def serve(engine: EngineClient, config: ServerConfig, sock: socket.socket | None = None) -> int:
    """Runs until SIGINT/SIGTERM, then drains. sock: an address claimed with bind_socket (else host:port)."""
    app = create_app(engine, config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2)  # ours: access_log
    await runner.setup()
    site = web.SockSite(runner, sock) if sock is not None else web.TCPSite(runner, config.host, config.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    st = app[STATE]
    dtypes = {i.role: str(i.pool.dtype).removeprefix("torch.") for i in engine.instances}  # per phase, if it differs
    dtype = next(iter(dtypes.values())) if len(set(dtypes.values())) == 1 else ", ".join(
        f"{role} {d}" for role, d in dtypes.items())
    lines = [f"distserve listening on http://{host}:{port} (model {st.model}, {engine.config.mode}, "
             f"dtype {dtype}, max context {engine.max_model_len})"]
    lines += [f"  {s.instance}: {s.role} on {s.device}, {s.kv_blocks_total} KV blocks" for s in engine.stats()]
    sampling = ", ".join(f"{k} {v:g}" for k, v in config.default_sampling.items()) or "OpenAI's (temperature 1)"
    lines += [f"  default sampling: {sampling}{f' ({config.sampling_source})' if config.sampling_source else ''}",
              f"  dashboard: http://{host}:{port}/dashboard   (SLOs TTFT {config.slo_ttft:g} s, "
              f"TPOT {config.slo_tpot:g} s; one log line per request)"]
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
    a("--served-model-name", default=None, help="model name clients use (default: the checkpoint's name)")
    a("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    a("--port", type=int, default=8000, help="port (0: any free port)")
    a("--api-key", default=os.environ.get(API_KEY_ENV),
      help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}; unset: no auth)")
    a("--plan", default=None, help="placement plan JSON from the planner (overrides mode and devices)")
    a("--max-body-bytes", default="1MiB", help="largest accepted request body (413 beyond)")
    a("--grace-period", type=float, default=30.0, help="seconds to let in-flight requests finish on shutdown")
    a("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level")

    g = p.add_argument_group("request surface, sampling defaults and dashboard")
    g.add_argument("--strict-params", action="store_true",
                   help="refuse unknown request fields with 400 (OpenAI); default: ignore them with a warning (vLLM)")
    g.add_argument("--default-temperature", type=float, default=None, metavar="T",
                   help="temperature for requests that set none (default: the checkpoint's generation config; "
                        "the bundled model's card says 0.2; else 1.0)")
    g.add_argument("--default-top-p", type=float, default=None, metavar="P",
                   help="top_p for requests that set none (default: the checkpoint's, else 1.0)")
    g.add_argument("--slo-ttft", type=float, default=1.0, metavar="S", help="dashboard TTFT target, seconds")
    g.add_argument("--slo-tpot", type=float, default=0.1, metavar="S", help="dashboard TPOT target, seconds")
    EngineArgs.add_cli_args(p, mode="disagg")
    return p


def default_sampling(args: argparse.Namespace) -> tuple[dict[str, float], str]:
    """The checkpoint's recommended sampling, overridden by --default-temperature / --default-top-p."""
    from engine.sampling_defaults import checkpoint_sampling

    defaults, source = checkpoint_sampling(args.model)
    flags = {k: v for k, v in (("temperature", args.default_temperature), ("top_p", args.default_top_p))
             if v is not None}
    if not 0.0 <= flags.get("temperature", 0.0) <= 2.0 or not 0.0 < flags.get("top_p", 1.0) <= 1.0:
        raise ValueError("--default-temperature must be in [0, 2] and --default-top-p in (0, 1]")
    if flags:
        source = "flags" if not defaults else f"flags over {source}"
    return {**defaults, **flags}, source if defaults or flags else ""


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """Flags (and --plan) -> EngineConfig. ValueError/PlanError say what is wrong."""
    eargs = EngineArgs.from_cli(args)
    if args.plan:
        layout = dict(devices=None, prefill_devices=None, decode_devices=None, chunked_prefill=False)
        eargs = replace(eargs, **(layout | load_plan(args.plan, args.cluster)))
    return eargs.engine_config()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        ecfg = engine_config(args)
        sampling, source = default_sampling(args)
        scfg = ServerConfig(host=args.host, port=args.port, api_key=args.api_key or None,
                            served_model_name=args.served_model_name, max_body_bytes=args.max_body_bytes,
                            grace_period=args.grace_period, strict_params=args.strict_params,
                            default_sampling=sampling, sampling_source=source, slo_ttft=args.slo_ttft,
                            slo_tpot=args.slo_tpot)
    except (PlanError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        sock = bind_socket(scfg.host, scfg.port)  # before the model loads: a busy port fails in a second
    except OSError as e:
        print(f"error: {bind_error(scfg.host, scfg.port, e)}", file=sys.stderr)
        return 2
    print(f"distserve: loading {args.model or 'the bundled SmolLM2-135M-Instruct'} ...", flush=True)
    engine = AsyncEngine(ecfg)  # loads the model before the loop starts
    import uvloop

    rc = uvloop.run(serve(engine, scfg, sock))
    if engine.hung:  # a thread stuck in a step or pull would keep the process alive forever
        log.error("instances %s are hung; exiting without waiting for their threads", ", ".join(engine.hung))
        logging.shutdown()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
