"""The engine: a Llama-family runtime on a paged KV cache (model, loader, tokenizer, sampler, KV pool,
instance workers) and the types every layer above shares (configs, the request, the step).
The async and offline APIs built on it are serving.AsyncEngine and serving.LLM."""
from engine.args import EngineArgs
from engine.config import EngineConfig, SamplingParams

__all__ = ["EngineArgs", "EngineConfig", "SamplingParams"]
