"""Serving: the engine driven by one asyncio loop, and the HTTP front door's parts (server.py is the app,
its lifecycle and the CLI).

engine.py: AsyncEngine (instances + the scheduler's Cluster + output processing).  llm.py: the offline LLM.
api.py: what the server may call (EngineClient) and what comes back (RequestOutput, InstanceStats).
outputs.py: tokens -> text deltas, stop strings, per-request streams.
state.py: ServerConfig and the per-app State.  generate.py: the completion endpoints, full and streamed.
errors.py: ApiError (OpenAI's error JSON).  schema.py: the request schema (pydantic) and its error messages.
protocol.py: validated OpenAI request bodies -> engine requests.  info.py: models, health, metrics, step trace.
listen.py: claiming the address before the model loads.  dashboard.py, static/: the live dashboard.
responses.py: engine outputs -> OpenAI responses, stream chunks, logprobs, usage.
sse.py: Server-Sent Events framing.  metrics.py: Prometheus metrics.  plan.py: --plan files.
"""
from engine.config import SamplingParams

__all__ = ["LLM", "AsyncEngine", "SamplingParams"]


def __getattr__(name: str):  # lazy: importing the package must not load torch-heavy modules
    if name == "LLM":
        from serving.llm import LLM
        return LLM
    if name == "AsyncEngine":
        from serving.engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(name)
