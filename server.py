"""The HTTP front door: an OpenAI-compatible API over the AsyncEngine (aiohttp on uvloop, orjson).

    python server.py [--model PATH] [--mode disagg|colocated] [--port 8000] ...   (see --help)

POST /v1/completions, POST /v1/chat/completions (stream: true -> SSE), GET /v1/models, GET /health,
GET /metrics (serving/metrics.py lists the series), GET /debug/steps (with --step-trace: the recorded steps,
drained; engine/step_trace.py). The generation path is serving/generate.py (parsing in
serving/protocol.py, response shapes in serving/responses.py). This file is the app, its lifecycle and the
CLI; it knows nothing about blocks or devices.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import AsyncEngine
from serving.generate import chat_completions, completions
from serving.metrics import CONTENT_TYPE, ServerMetrics
from serving.plan import PlanError, load_plan
from serving.protocol import ApiError
from serving.responses import Formatter
from serving.state import STATE, ServerConfig, State

__all__ = ["STATE", "ServerConfig", "create_app", "drain", "main", "serve"]

log = logging.getLogger("distserve.server")
API_KEY_ENV = "API_KEY"


_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/debug/steps"}


def _error(e: ApiError) -> web.Response:
    return web.Response(body=orjson.dumps(e.body()), status=e.status, content_type="application/json",
                        headers=e.headers)




@web.middleware
async def _middleware(request: web.Request, handler) -> web.StreamResponse:
    """Auth, OpenAI error bodies for every failure, and request counting. Nothing escapes as a crash."""
    st = request.app[STATE]
    resp: web.StreamResponse | None = None
    status = 500
    try:
        key = st.config.api_key
        if key and request.path.startswith(("/v1/", "/debug/")):
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


async def debug_steps(request: web.Request) -> web.Response:
    """The step trace recorded since the last call (and forgets it), for fitting the planner in-server."""
    trace = request.app[STATE].engine.step_trace
    if trace is None:
        raise ApiError(404, "step tracing is off (start the server with --step-trace N)", "invalid_request_error",
                       None, "not_found")
    return web.Response(body=orjson.dumps({"steps": trace.drain()}), content_type="application/json")


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
    app.router.add_get("/debug/steps", debug_steps)
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
    a("--dtype", choices=("auto", "bfloat16", "float32", "float16"), default="auto", help="activations and KV dtype")
    a("--weights", choices=("auto", "dense", "native"), default="auto",
      help="native: the GGUF's own Q4_0/Q4_1/Q8_0 blocks; dense: dequantized to --dtype (auto: native if it can)")
    a("--compile", action=argparse.BooleanOptionalAction, default=False,
      help="compiled decode steps (torch.compile; the first start on a machine compiles for minutes, later "
           "starts load them from the disk cache)")
    a("--max-num-seqs", type=int, default=64, help="running decodes per instance")
    a("--max-waiting", type=int, default=4096, help="admission queue bound; beyond it requests get 503")
    a("--max-prefill-tokens", type=int, default=4096, help="prompt tokens per prefill batch (FCFS)")
    a("--chunk-budget", type=int, default=512,
      help="--chunked-prefill: tokens per step (decode tokens first, then prompt chunks)")
    a("--kv-cache-memory", default="512MiB", help="KV cache budget per instance, e.g. 512MiB, 2GiB")
    a("--api-key", default=os.environ.get(API_KEY_ENV),
      help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}; unset: no auth)")
    a("--step-trace", type=int, default=0, metavar="N",
      help="record the last N engine steps (shape, iteration time) for GET /debug/steps (default 0: off)")
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
    return EngineConfig(model=args.model, dtype=args.dtype, weights=args.weights, compile=args.compile, **layout,
                        step_trace=args.step_trace,
                        cache=CacheConfig(memory_bytes=args.kv_cache_memory),
                        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting,
                                                  max_prefill_tokens=args.max_prefill_tokens,
                                                  chunk_budget=args.chunk_budget))


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
