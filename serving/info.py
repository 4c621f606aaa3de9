"""The routes that describe the server rather than generate: models, health, metrics, the step trace."""
from __future__ import annotations

import orjson
from aiohttp import web

from serving.errors import ApiError
from serving.metrics import CONTENT_TYPE
from serving.state import STATE, State


def _card(st: State) -> dict:
    return {"id": st.model, "object": "model", "created": st.created, "owned_by": "distserve",
            "max_model_len": st.engine.max_model_len}


async def models(request: web.Request) -> web.Response:
    body = {"object": "list", "data": [_card(request.app[STATE])]}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def model_card(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: the openai client's models.retrieve."""
    st, name = request.app[STATE], request.match_info["id"]
    if name not in (st.model, st.engine.model_name):
        raise ApiError(404, f"model '{name}' does not exist; this server serves '{st.model}'", param="model",
                       code="model_not_found")
    return web.Response(body=orjson.dumps(_card(st)), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    """200 while requests can be served: status "ready", or "degraded" with an instance out of dispatch; else
    503: "starting", "draining", or "unavailable" (no instance of a role left). Each instance's state."""
    st = request.app[STATE]
    stats = st.engine.stats()
    body: dict = {"status": st.phase, "instances": [
        {"name": s.instance, "role": s.role, "device": s.device, "state": s.state, "faults": s.faults}
        for s in stats]}
    lost = sorted({s.role for s in stats} - {s.role for s in stats if s.state == "ok"})
    if st.phase == "ready" and lost:
        body["status"], body["error"] = "unavailable", f"no {' or '.join(lost)} instance left in dispatch"
    elif st.phase == "ready" and any(s.state != "ok" for s in stats):
        body["status"] = "degraded"
    return web.Response(body=orjson.dumps(body), status=200 if body["status"] in ("ready", "degraded") else 503,
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
