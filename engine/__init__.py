"""The engine: a Llama-family runtime on a paged KV cache, and the offline / async APIs over it."""
from engine.config import EngineConfig, SamplingParams

__all__ = ["LLM", "AsyncEngine", "EngineConfig", "SamplingParams"]


def __getattr__(name: str):  # lazy: importing the package must not load torch-heavy modules
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    if name == "AsyncEngine":
        from engine.engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(name)
