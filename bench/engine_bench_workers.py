"""The two systems the engine bench compares, behind one interface, and the workload they both run.

Both systems see the same prompts (seeded random token ids), the same dtype, the same cores and
thread count, and both generate greedily without stopping at EOS, so they produce the same tokens
(up to rounding near ties) and do the same work. Definitions, identical for both:
  prefill wall     one generate call that returns 1 new token for B prompts of L tokens;
  prefill forward  ours: the engine's prefill span (metrics prefill_end - prefill_start, one packed
                   forward + sampling); transformers: one forward over [B, L] with logits_to_keep=1;
  decode wall      one generate call, B prompts, N new tokens: B*N tokens / wall;
  decode only      B*(N-1) tokens after the first; ours: from the first to the last token time;
                   transformers: wall(N new tokens) - wall(1 new token).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from functools import partial

import torch

from engine.config import ModelConfig, SamplingParams
from engine.loader import Checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Workload:
    prefill_len: int = 512
    prefill_batches: tuple[int, ...] = (1, 4)
    decode_prompt: int = 32
    decode_new: int = 64
    decode_batches: tuple[int, ...] = (1, 8, 32)
    iters: int = 2  # timed runs of each measurement; the fastest is kept
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.prefill_len, self.decode_prompt, self.iters) < 1 or self.decode_new < 2:
            raise ValueError(f"bad workload {self}: lengths and iters >= 1, decode_new >= 2")

    @classmethod
    def quick(cls) -> Workload:
        return cls(prefill_len=128, decode_new=8, iters=1)

    def kv_tokens(self, block_size: int) -> int:
        """KV blocks the largest phase needs (what transformers' growing cache holds at most)."""
        per = lambda n, b: b * -(-n // block_size)  # noqa: E731
        return max(max(per(self.prefill_len + 1, b) for b in self.prefill_batches),
                   max(per(self.decode_prompt + self.decode_new, b) for b in self.decode_batches))


def prompts(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 1000 + batch * 7 + length)
    low = min(32, vocab // 4)  # skip the special tokens at the bottom of the vocab
    return torch.randint(low, vocab, (batch, length), generator=g).tolist()


class Ours:
    """Our engine, colocated on `cores`, the KV pool sized to the workload. Consumes ckpt.weights.

    precision: float32 / bfloat16 (dense weights in that dtype) or native (the GGUF's own blocks, float32
    activations); compile: decode steps through torch.compile (its warm-up is timed as load)."""

    name = "ours"

    def __init__(self, ckpt: Checkpoint, precision: str, cores: list[int], w: Workload, block_size: int = 16,
                 compile: bool = False) -> None:
        from serving.llm import LLM

        batch = max(*w.decode_batches, *w.prefill_batches)
        dtype, weights = ("auto", "native") if precision == "native" else (precision, "dense")
        self.llm = LLM(dtype=dtype, weights=weights, compile=compile, checkpoint=ckpt,
                       devices=["cpu:" + ",".join(map(str, cores))],
                       num_kv_blocks=w.kv_tokens(block_size) + batch, block_size=block_size,
                       max_num_seqs=batch, max_prefill_tokens=max(4096, w.prefill_len * max(w.prefill_batches)))
        ckpt.weights.clear()  # the model holds what it needs; free the loader's copies
        ckpt.quantized.clear()
        inst = self.llm.engine.instances[0]
        self.weight_bytes = inst.model.weight_bytes
        self.compile_s = None
        if inst.compiled is not None:  # wait for the warm-up queued on the instance thread
            inst.executor.submit(lambda: None).result()
            self.compile_s = sum(inst.compiled.compile_s.values())

    def prefill(self, ids: list[list[int]]) -> dict:
        t0 = time.perf_counter()
        outs = self.llm.generate(ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        wall = time.perf_counter() - t0
        fwd = max(o.metrics.prefill_end for o in outs) - min(o.metrics.prefill_start for o in outs)
        return {"wall": wall, "forward": fwd, "tokens": [o.token_ids for o in outs]}

    def decode(self, ids: list[list[int]], new: int) -> dict:
        t0 = time.perf_counter()
        outs = self.llm.generate(ids, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
        wall = time.perf_counter() - t0
        first = max(o.metrics.token_times[0] for o in outs)
        last = max(o.metrics.token_times[-1] for o in outs)
        return {"wall": wall, "decode_only": last - first, "tokens": [o.token_ids for o in outs]}

    def close(self) -> None:
        self.llm.close()


def hf_config(cfg: ModelConfig):
    import transformers

    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
              rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
              tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings,
              bos_token_id=cfg.bos_token_id, eos_token_id=None, pad_token_id=0)
    if cfg.arch == "qwen2":
        return transformers.Qwen2Config(**kw)
    return transformers.LlamaConfig(**kw, attention_bias=cfg.attention_bias)


class HF:
    """transformers' LlamaForCausalLM (Qwen2 for qwen2) with the checkpoint's dense weights, sdpa
    attention, `generate` with its default dynamic cache. Consumes ckpt.weights."""

    name = "hf"

    def __init__(self, ckpt: Checkpoint, dtype: str, cores: list[int], w: Workload) -> None:
        import transformers

        cfg = hf_config(ckpt.config)
        cls = transformers.Qwen2ForCausalLM if ckpt.config.arch == "qwen2" else transformers.LlamaForCausalLM
        model = cls._from_config(cfg, attn_implementation="sdpa")
        sd = dict(ckpt.weights)
        if ckpt.config.tie_word_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        model.load_state_dict(sd, strict=True)
        model.tie_weights()
        self.model = model.to(DTYPES[dtype]).eval()
        del sd, model
        ckpt.weights.clear()
        gc.collect()
        from engine.memory import tune_malloc_for_serving

        tune_malloc_for_serving()  # the same allocator settings as our engine after its load
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())  # tied: once

    def _generate(self, ids: torch.Tensor, new: int) -> torch.Tensor:
        import transformers

        # no EOS: exactly `new` tokens, as ours with ignore_eos (min_new_tokens would mask EOS instead)
        gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=new, min_new_tokens=new,
                                            eos_token_id=None, pad_token_id=0)
        with torch.inference_mode():
            return self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)

    def prefill(self, ids: list[list[int]]) -> dict:
        x = torch.tensor(ids)
        t0 = time.perf_counter()
        out = self._generate(x, 1)
        wall = time.perf_counter() - t0
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model(x, attention_mask=torch.ones_like(x), logits_to_keep=1)
            fwd = time.perf_counter() - t0
        return {"wall": wall, "forward": fwd, "tokens": out[:, x.shape[1]:].tolist()}

    def decode(self, ids: list[list[int]], new: int) -> dict:
        x = torch.tensor(ids)
        t0 = time.perf_counter()
        self._generate(x, 1)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = self._generate(x, new)
        wall = time.perf_counter() - t0
        return {"wall": wall, "decode_only": max(wall - one, 1e-9), "tokens": out[:, x.shape[1]:].tolist()}

    def close(self) -> None:
        pass


def measure(system: Ours | HF, vocab: int, w: Workload) -> dict:
    """Run the workload: per shape, one warm-up, then the fastest of w.iters timed runs."""
    res: dict = {"prefill": {}, "decode": {}}

    def best(fn) -> dict:
        runs = [fn() for _ in range(w.iters)]
        out = min(runs, key=lambda r: r["wall"])
        for key in ("forward", "decode_only"):
            if key in out:
                out[key] = min(r[key] for r in runs)
        return out

    for b in w.prefill_batches:
        ids = prompts(vocab, b, w.prefill_len, w.seed)
        system.prefill(ids)
        r = best(partial(system.prefill, ids))
        n = b * w.prefill_len
        res["prefill"][str(b)] = {"batch": b, "tokens_in": n, "wall_s": r["wall"], "forward_s": r["forward"],
                                  "tok_s": n / r["wall"], "forward_tok_s": n / r["forward"], "tokens": r["tokens"]}
    for b in w.decode_batches:
        ids = prompts(vocab, b, w.decode_prompt, w.seed)
        system.decode(ids, 2)
        r = best(partial(system.decode, ids, w.decode_new))
        res["decode"][str(b)] = {"batch": b, "wall_s": r["wall"], "decode_only_s": r["decode_only"],
                                 "tok_s": b * w.decode_new / r["wall"],
                                 "decode_only_tok_s": b * (w.decode_new - 1) / r["decode_only"],
                                 "steps_s": (w.decode_new - 1) / r["decode_only"], "tokens": r["tokens"]}
    return res


def run_worker(system: str, ckpt: Checkpoint, precision: str, cores: list[int], w: Workload,
               compile: bool = False) -> dict:
    """Build one system from ckpt (consuming its weights), run the workload, report times and memory.
    precision: float32 / bfloat16 / native; transformers runs native as float32 (dense, dequantized)."""
    from bench import engine_bench_machine as m

    torch.set_num_threads(len(cores))
    vocab = ckpt.config.vocab_size
    t0 = time.perf_counter()
    if system == "ours":
        sys_ = Ours(ckpt, precision, cores, w, compile=compile)
    else:
        sys_ = HF(ckpt, "float32" if precision == "native" else precision, cores, w)
    gc.collect()
    mem = {"load_s": time.perf_counter() - t0, "rss_after_load": m.rss_bytes(),
           "lifetime_peak_at_load": m.lifetime_peak_rss_bytes(), "peak_reset": m.reset_peak_rss()}
    try:
        res = measure(sys_, vocab, w)
    finally:
        sys_.close()
    mem["peak_rss_run"] = m.peak_rss_bytes() if mem["peak_reset"] else None
    mem["lifetime_peak_rss"] = max(mem["lifetime_peak_at_load"], m.lifetime_peak_rss_bytes())
    return {"system": system, "dtype": precision, "threads": len(cores), "weight_bytes": sys_.weight_bytes,
            "compile_s": getattr(sys_, "compile_s", None), "memory": mem, **res}


def run_llama(ckpt_path: str, precision: str, cores: list[int], w: Workload, isa: str | None = None) -> dict:
    """llama.cpp on the same weights at `precision` (bench/llama_cpp.py), in the workers' result shape:
    prefill from llama-bench (B=1), decode from llama-batched-bench (generated tokens only). isa: its build
    for that instruction set only (llama_cpp.ISA_SETS)."""
    import os

    from bench import llama_cpp

    cache = llama_cpp.cache_for(isa)
    llama_cpp.ensure_built(cache, model=ckpt_path, isa=isa)
    model = llama_cpp.model_for(precision, ckpt_path, tools=cache)  # the weight copies are shared by every build
    pre = llama_cpp.prefill(model, cores, w.prefill_len, cache=cache)
    dec = llama_cpp.decode(model, cores, w.decode_batches, w.decode_prompt, w.decode_new, cache=cache)
    n = w.prefill_len
    prefill = {"1": {"batch": 1, "tokens_in": n, "tok_s": pre["tok_s"], "forward_tok_s": pre["tok_s"],
                     "wall_s": n / pre["tok_s"], "forward_s": n / pre["tok_s"]}}
    decode = {b: {"batch": d["batch"], "tok_s": d["tok_s"], "decode_only_tok_s": d["tok_s"],
                  "steps_s": d["tok_s"] / d["batch"]} for b, d in dec["decode"].items()}
    return {"system": "llama", "dtype": precision, "threads": len(cores), "weight_bytes": os.path.getsize(model),
            "commands": [pre["command"], dec["command"]], "prefill": prefill, "decode": decode}
