"""fluxserve inside vLLM on the GPU, side by side with stock vLLM: correctness and serving figures.

One run starts several engines, each in its own process (``engine`` sub-command), on a
Llama-3.1-8B-shaped model (32 layers, hidden 4096, 32 q / 8 KV heads of 128, MLP 14336, vocab
128256, bf16) whose config is generated here and whose weights are random:

- ``load_format="dummy"`` (no checkpoint on disk), then every engine overwrites the dummy
  weights with the same seeded N(0, 0.02) tensors (norm weights 1), generated per checkpoint
  name on the GPU and fed to vLLM's in-place ``reload_weights`` (the model's own
  ``load_weights``, which shards and fuses them). vLLM's dummy values (uniform ±1e-3) give
  near-flat logits, where greedy tokens are rounding noise; through ``load_weights`` every
  engine, at any tensor-parallel size, holds the same model. CUDA graphs keep working: the
  parameters are written in place.
- engines (``--engines``): ``stock`` (no plugin: ``VLLM_PLUGINS=none``, vLLM's default attention
  backend and model runner), ``flux`` (fluxserve as ``fluxserve serve`` configures it:
  ``attention_backend=CUSTOM``, V1 model runner, the KV-policy scheduler), ``flux-eager`` (the
  same with ``enforce_eager``: the reference for CUDA-graph replay), ``flux-piecewise`` (the
  same with our FULL decode graphs off: steps with our rows run our attention eagerly between
  piecewise graphs), ``flux-tp2`` (two GPUs).
  Engines on different GPUs run at the same time.
- each engine runs in-process (``LLMEngine`` with ``add_request``/``step``, no HTTP server), so
  the harness reads the scheduler directly: requests running, KV blocks free.

Jobs, in this order, for every engine (stock ignores the fluxserve options):
``check`` (greedy tokens and top-5 logprobs of short requests of every mode, alone and in a
64-request mixed batch), ``ttft`` (one 32K and one 128K prompt per mode), ``decode`` (time per
output token at 8 and 32 concurrent 32K-context streams; by default they share one prefix, so
one prefill serves all, see ``--distinct-contexts``), ``capacity`` (most concurrent 32K
requests decoding in a fixed KV pool, none vs calidrop 2048), ``profile`` (torch profiler of
decode steps). The driver compares engines and prints a table last; full results go to
``$OUT/gpu_serving.json``, logs to ``$OUT/engines.log``.

    python3 benchmarks/gpu_serving.py --out $OUT                       # GPU: everything
    python3 benchmarks/gpu_serving.py --out /tmp/x --tiny --engines stock,flux  # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

SEED = 20261130
INIT_STD = 0.02


# ----------------------------------------------------------------------------- sizes
@dataclass
class Scale:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    max_model_len: int
    ctx_32k: int  # "32K" context
    ctx_128k: int  # "128K" prompt (fits max_model_len with its output)
    check_lens: tuple[int, int]  # prompt lengths of the check requests (min, max)
    check_sink: int
    check_window: int
    check_budget: int
    sink: int  # the serving figures' sparse shape and CaliDrop budget
    window: int
    budget: int
    pool_tokens: int  # fixed KV pool of the capacity test
    capacity_requests: int
    max_num_batched_tokens: int
    mixed_requests: int = 64  # the check's mixed batch
    check_tokens: int = 24  # tokens per single check request
    decode_steps: int = 24  # timed steps per decode figure
    decode_batches: tuple[int, int] = (8, 32)  # concurrent streams of the decode figures


GPU = Scale(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, mlp=14336, vocab=128256,
            max_model_len=131072, ctx_32k=32768, ctx_128k=131072 - 64, check_lens=(1000, 5000),
            check_sink=64, check_window=512, check_budget=512, sink=128, window=2048,
            budget=2048, pool_tokens=65536, capacity_requests=20, max_num_batched_tokens=16384)
TINY = Scale(layers=4, hidden=256, heads=4, kv_heads=2, head_dim=64, mlp=512, vocab=2048,
             max_model_len=8192, ctx_32k=2048, ctx_128k=4096, check_lens=(200, 700),
             check_sink=8, check_window=64, check_budget=96, sink=16, window=256, budget=256,
             pool_tokens=4096, capacity_requests=6, max_num_batched_tokens=2048,
             mixed_requests=14, check_tokens=6, decode_steps=3, decode_batches=(2, 4))


def mode_options(scale: Scale, check: bool) -> dict[str, dict]:
    """Request options by mode name: ``{"flux": ..., "kv_policy": ...}`` as the server sends
    them (``SamplingParams.extra_args``), validated by fluxserve's own option models."""
    from attention_backends.flux.options import FluxOptions
    from kv_policies.eviction.options import parse_kv_policy

    sink, window, budget = ((scale.check_sink, scale.check_window, scale.check_budget) if check
                            else (scale.sink, scale.window, scale.budget))
    n_full = max(1, round(scale.layers * 0.1))  # "90 % of layers sparse": the first 10 % full
    flux = {
        "full": FluxOptions(mode="full"),
        "sparse": FluxOptions(mode="sparse", sink=sink, window=window),
        "layers90": FluxOptions(mode="layers", sparse_layers=list(range(n_full, scale.layers)),
                                sink=sink, window=window),
    }
    kv = {"calidrop": parse_kv_policy({"name": "calidrop", "budget": budget}),
          "snapkv": parse_kv_policy({"name": "snapkv", "budget": budget})}
    out = {"none": {}}
    for name, f in flux.items():
        out[name] = {"flux": f.to_extra_args()}
    for name, k in kv.items():
        out[name] = {"kv_policy": k.to_extra_args()}
    out["sparse+calidrop"] = {"flux": flux["sparse"].to_extra_args(),
                              "kv_policy": kv["calidrop"].to_extra_args()}
    out["auto"] = {"flux": FluxOptions(mode="auto").to_extra_args()}
    return out


CHECK_MODES = ["none", "full", "sparse", "layers90", "calidrop", "snapkv", "sparse+calidrop",
               "auto"]
# short prompts (fewer tokens than the largest CUDA graph) of these modes: a step that routes
# ``auto`` requests must run without graphs, one with sparse rows without a FULL graph
SHORT_MODES = ["none", "sparse", "auto"]
SERVE_MODES = ["none", "full", "sparse", "layers90", "calidrop"]


# ----------------------------------------------------------------------------- model
def write_model(path: Path, scale: Scale) -> Path:
    """A Llama-3.1-8B-shaped config (or the tiny one) and the smoke-test model's tokenizer."""
    from server import default_model as dm

    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_bytes(dm._tokenizer_json())
    dm._write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": dm.BOS_TOKEN,
        "eos_token": dm.EOS_TOKEN, "pad_token": dm.EOS_TOKEN,
        "model_max_length": scale.max_model_len, "chat_template": dm.CHAT_TEMPLATE})
    rope = {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}} if scale == GPU else {"rope_theta": 10000.0}
    dm._write_json(path / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": scale.vocab, "hidden_size": scale.hidden,
        "intermediate_size": scale.mlp, "num_hidden_layers": scale.layers,
        "num_attention_heads": scale.heads, "num_key_value_heads": scale.kv_heads,
        "head_dim": scale.head_dim, "hidden_act": "silu",
        "max_position_embeddings": scale.max_model_len, "rms_norm_eps": 1e-5,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, **rope})
    return path


def write_router(path: Path, scale: Scale, sink: int, window: int) -> Path:
    """A standalone Flux router of random weights for ``scale`` (``--flux-router``'s files),
    seeded: every engine routes alike. Its decisions mean nothing; it exercises ``auto``."""
    import torch

    from attention_backends.flux.router import FluxRouter, RouterSpec, save_router_file

    torch.manual_seed(SEED)
    routers = [FluxRouter(scale.head_dim) for _ in range(scale.layers)]
    save_router_file(routers, path, RouterSpec(pool_size=100, sink=sink, window=window))
    return path


def llama_weight_shapes(cfg) -> list[tuple[str, tuple[int, ...]]]:
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv, m, v = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, \
        cfg.intermediate_size, cfg.vocab_size
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(L):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                   (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)),
                   (p + "self_attn.o_proj.weight", (h, q)),
                   (p + "post_attention_layernorm.weight", (h,)),
                   (p + "mlp.gate_proj.weight", (m, h)), (p + "mlp.up_proj.weight", (m, h)),
                   (p + "mlp.down_proj.weight", (h, m))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def reinit_weights(worker, seed: int, std: float) -> int:
    """Runs in each worker (``collective_rpc``): overwrite the model's weights in place;
    returns the worker's parameter count."""
    import zlib

    import torch

    model = worker.get_model()
    cfg = worker.vllm_config.model_config.hf_text_config
    dev = next(model.parameters()).device

    def tensors():
        for name, shape in llama_weight_shapes(cfg):
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape, dtype=torch.bfloat16, device=dev)
                continue
            g = torch.Generator(device=dev)
            g.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            t = torch.randn(shape, generator=g, device=dev, dtype=torch.float32) * std
            yield name, t.to(torch.bfloat16)

    # vLLM's in-place reload (the path RL weight updates take): the model's own load_weights
    # shards and fuses the checkpoint tensors, then copies into the existing storage.
    worker.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return sum(p.numel() for p in model.parameters())


def prompt_ids(n: int, seed: int, vocab: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n,), generator=g).tolist()


# ----------------------------------------------------------------------------- engine child
class Engine:
    def __init__(self, spec: dict) -> None:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        self.spec = spec
        self.scale = Scale(**{**spec["scale"], "check_lens": tuple(spec["scale"]["check_lens"]),
                              "decode_batches": tuple(spec["scale"]["decode_batches"])})
        kind = spec["kind"]
        self.flux = kind.startswith("flux")
        kw = dict(model=spec["model"], load_format="dummy", dtype="bfloat16", seed=0,
                  max_model_len=self.scale.max_model_len, skip_tokenizer_init=True,
                  max_num_seqs=64, max_num_batched_tokens=self.scale.max_num_batched_tokens,
                  tensor_parallel_size=spec.get("tp", 1), enforce_eager=kind == "flux-eager")
        if self.flux and spec.get("router"):
            kw["additional_config"] = {"flux_router": spec["router"]}
        if kind == "flux-piecewise":  # our attention eager between piecewise graphs
            kw["additional_config"] = {**kw.get("additional_config", {}),
                                       "flux_full_cuda_graphs": False}
        if spec["device"] == "cpu":
            kw["kv_cache_memory_bytes"] = 2 << 30
        else:
            kw["gpu_memory_utilization"] = 0.85
            if self.flux:
                kw["attention_backend"] = "CUSTOM"  # as `fluxserve serve` selects it on CUDA
        t0 = time.perf_counter()
        args = EngineArgs(**kw)
        config = args.create_engine_config()
        if self.flux:
            from server.engine import install_extensions

            install_extensions(config)
        self.engine = LLMEngine.from_vllm_config(config, disable_log_stats=False)
        self.core = self.engine.engine_core.engine_core
        self.sched = self.core.scheduler
        self.start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.loaded = self.engine.collective_rpc(reinit_weights, args=(SEED, INIT_STD))
        self.reinit_s = time.perf_counter() - t0
        cc = config.compilation_config
        self.info = {"start_s": self.start_s, "reinit_s": self.reinit_s,
                     "weights_loaded": self.loaded, "cudagraph_mode": str(cc.cudagraph_mode),
                     "capture_sizes": list(cc.cudagraph_capture_sizes or []),
                     "v2_model_runner": bool(config.use_v2_model_runner),
                     "scheduler_cls": str(config.scheduler_config.scheduler_cls),
                     "async_scheduling": bool(config.scheduler_config.async_scheduling),
                     "attention_backend": str(config.attention_config.backend),
                     "num_gpu_blocks": config.cache_config.num_gpu_blocks,
                     "block_size": config.cache_config.block_size}
        self.modes = mode_options(self.scale, check=False) if self.flux else None
        self.check_modes = mode_options(self.scale, check=True) if self.flux else None
        self._n = 0

    # -- helpers
    def params(self, mode: str | None, max_tokens: int, check: bool = False, logprobs=None):
        from vllm import SamplingParams

        extra = None
        if self.flux and mode is not None:
            extra = dict((self.check_modes if check else self.modes)[mode]) or None
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                              detokenize=False, logprobs=logprobs, extra_args=extra)

    def add(self, ids: list[int], params) -> str:
        self._n += 1
        rid = f"r{self._n}"
        self.engine.add_request(rid, {"prompt_token_ids": ids}, params)
        return rid

    def run_until(self, done, limit_s: float = 600.0) -> dict:
        """Step until ``done(outputs_by_id)``; returns the outputs seen (latest per id)."""
        seen: dict = {}
        t0 = time.perf_counter()
        while not done(seen):
            for out in self.engine.step():
                seen[out.request_id] = out
            if time.perf_counter() - t0 > limit_s:
                raise TimeoutError(f"not done after {limit_s} s")
        return seen

    def abort_all(self) -> None:
        ids = [r.request_id for r in list(self.sched.running) + list(self.sched.waiting)]
        if ids:  # the scheduler's ids are vLLM's internal ones
            self.engine.abort_request(ids, internal=True)
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def free_blocks(self) -> int:
        return self.sched.kv_cache_manager.block_pool.get_num_free_blocks()

    # -- jobs
    def job_check(self) -> dict:
        """Greedy tokens + top-5 logprobs: each mode alone, then 64 requests of all modes."""
        s = self.scale
        lo, hi = s.check_lens
        res = {"single": {}, "mixed": {}}

        def collect(outs: dict, ids: dict) -> dict:
            r = {}
            for key, rid in ids.items():
                o = outs[rid].outputs[0]
                lps = []
                for step in o.logprobs or []:
                    top = sorted(((int(t), float(lp.logprob)) for t, lp in step.items()),
                                 key=lambda x: -x[1])
                    lps.append(top)
                r[key] = {"tokens": list(o.token_ids), "logprobs": lps}
            return r

        for i, mode in enumerate(CHECK_MODES):
            ids = {mode: self.add(prompt_ids(hi - 7 * i, SEED + i, s.vocab),
                                  self.params(mode, s.check_tokens, check=True, logprobs=5))}
            outs = self.run_until(lambda o, ids=ids: all(
                r in o and o[r].finished for r in ids.values()))
            res["single"].update(collect(outs, ids))
        # short prompts, one at a time and then together: steps small enough for CUDA graphs
        res["short"] = {}
        for i, mode in enumerate(SHORT_MODES):
            ids = {f"short:{mode}": self.add(prompt_ids(40 + 3 * i, SEED + 2000 + i, s.vocab),
                                             self.params(mode, s.check_tokens, check=True,
                                                         logprobs=5))}
            outs = self.run_until(lambda o, ids=ids: all(
                r in o and o[r].finished for r in ids.values()))
            res["short"].update(collect(outs, ids))
        ids = {f"short{i}:{mode}": self.add(prompt_ids(24 + 5 * i, SEED + 2100 + i, s.vocab),
                                            self.params(mode, s.check_tokens, check=True,
                                                        logprobs=5))
               for i, mode in enumerate(SHORT_MODES * 2)}
        outs = self.run_until(lambda o: all(r in o and o[r].finished for r in ids.values()))
        res["short"].update(collect(outs, ids))
        if self.flux:
            res["auto_requests"] = sum(k.split(":")[-1] == "auto" for part in ("single", "short")
                                       for k in res[part]) + sum(
                CHECK_MODES[i % len(CHECK_MODES)] == "auto" for i in range(s.mixed_requests))
        ids = {}
        for i in range(s.mixed_requests):
            mode = CHECK_MODES[i % len(CHECK_MODES)]
            n = lo + (i * 397) % (hi - lo)
            ids[f"{i}:{mode}"] = self.add(prompt_ids(n, SEED + 1000 + i, s.vocab),
                                          self.params(mode, 4 + (i * 7) % (s.check_tokens + 17),
                                                      check=True,
                                                      logprobs=5))
        outs = self.run_until(lambda o: all(r in o and o[r].finished for r in ids.values()))
        res["mixed"] = collect(outs, ids)
        trace = Path(self.spec.get("trace") or "/nonexistent")
        if self.flux and trace.exists():  # one line per routed request (and rank)
            recs = [json.loads(x) for x in trace.read_text().splitlines() if x.strip()]
            res["auto_routed"] = len({r["req_id"] for r in recs})
            by_req: dict = {}
            for r in recs:
                by_req.setdefault(r["req_id"], {})[r.get("tp_rank", 0)] = r["sparse"]
            # every rank took the same decisions (TP: one all-reduce before the router)
            res["ranks_agree"] = all(len({json.dumps(v) for v in d.values()}) == 1
                                     for d in by_req.values())
            res["ranks_seen"] = sorted({r.get("tp_rank", 0) for r in recs})
        return res

    def _ttft(self, ids: list[int], mode: str) -> float:
        t0 = time.perf_counter()
        rid = self.add(ids, self.params(mode, 1))
        self.run_until(lambda o: rid in o and len(o[rid].outputs[0].token_ids) >= 1)
        dt = time.perf_counter() - t0
        self.abort_all()
        return dt

    def job_ttft(self) -> dict:
        s = self.scale
        modes = SERVE_MODES if self.flux else ["none"]
        res = {}
        # a prompt of its own for every run: no prefix-cache hits (full shares with none)
        for i, mode in enumerate(modes):  # 32K twice (the first run compiles what it needs)
            a = self._ttft(prompt_ids(s.ctx_32k, SEED + 7 + 10 * i, s.vocab), mode)
            b = self._ttft(prompt_ids(s.ctx_32k, SEED + 8 + 10 * i, s.vocab), mode)
            res[f"32K:{mode}"] = {"first_s": a, "ttft_s": b}
        for i, mode in enumerate(modes):
            if mode == "full":
                continue  # same attention path as none at this length; time spent elsewhere
            res[f"128K:{mode}"] = {"ttft_s": self._ttft(prompt_ids(s.ctx_128k, SEED + 9 + 10 * i,
                                                                   s.vocab), mode)}
        return res

    def _streams(self, mode: str, b: int, ctx: int, steps: int, profile: bool = False) -> dict:
        """b concurrent decode streams at context ctx; returns time per output token."""
        s = self.scale
        distinct = bool(self.spec.get("distinct_contexts"))
        base = prompt_ids(ctx - 16, SEED + 11, s.vocab)
        prompts = [(prompt_ids(ctx - 16, SEED + 300 + i, s.vocab) if distinct else base)
                   + prompt_ids(16, SEED + 100 + i, s.vocab) for i in range(b)]
        p = self.params(mode, min(4096, s.max_model_len - ctx))
        t0 = time.perf_counter()
        # Shared: one prefill, the other streams hit the prefix cache (their KV blocks are the
        # same, which L2 partly serves). Compressed requests never read the prefix cache.
        shared = not distinct and mode not in ("calidrop",)
        ids = [self.add(prompts[0], p)] if shared else [self.add(x, p) for x in prompts]
        self.run_until(lambda o: all(r in o and o[r].outputs[0].token_ids for r in ids))
        if shared:
            ids += [self.add(x, p) for x in prompts[1:]]
            self.run_until(lambda o: all(r in o and o[r].outputs[0].token_ids for r in ids))
        setup = time.perf_counter() - t0
        for _ in range(3):
            self.engine.step()
        decoding = sum(1 for r in self.sched.running
                       if r.num_computed_tokens >= r.num_prompt_tokens)
        times = []
        prof_table = None
        if profile:
            import torch
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as tprofile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                             if torch.cuda.is_available() else [])
            with tprofile(activities=acts) as prof:
                for _ in range(4):
                    self.engine.step()
            key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
            prof_table = prof.key_averages().table(sort_by=key, row_limit=18,
                                                     max_name_column_width=70)
        for _ in range(steps):
            t = time.perf_counter()
            self.engine.step()
            times.append(time.perf_counter() - t)
        self.abort_all()
        med = statistics.median(times)
        return {"b": b, "ctx": ctx, "decoding_rows": decoding, "setup_s": setup,
                "tpot_ms": med * 1e3, "mean_step_ms": statistics.mean(times) * 1e3,
                "tok_s": b / statistics.mean(times), "profile": prof_table}

    def job_decode(self) -> dict:
        s = self.scale
        modes = SERVE_MODES if self.flux else ["none"]
        res = {}
        for b in s.decode_batches:
            for mode in modes:
                if mode == "calidrop" and b > 8 and not self.spec.get("calidrop_b32"):
                    continue  # 32 full 32K prefills (no prefix cache): see the capacity job
                res[f"B{b}:{mode}"] = self._streams(mode, b, s.ctx_32k, s.decode_steps)
        return res

    def job_ttft_short(self) -> dict:
        s = self.scale
        self._ttft(prompt_ids(s.ctx_32k, SEED + 40, s.vocab), "sparse")  # compile what it needs
        return {f"32K:{m}": {"ttft_s": self._ttft(prompt_ids(s.ctx_32k, SEED + 41 + i, s.vocab), m)}
                for i, m in enumerate(("none", "sparse"))}

    def job_decode_short(self) -> dict:
        return {f"B8:{m}": self._streams(m, 8, self.scale.ctx_32k, self.scale.decode_steps)
                for m in ("none", "sparse")}

    def job_profile(self) -> dict:
        modes = ["none", "sparse"] if self.flux else ["none"]
        b = self.scale.decode_batches[-1]
        return {f"B{b}:{m}": self._streams(m, b, self.scale.ctx_32k, 4, profile=True)
                for m in modes}

    def job_capacity(self) -> dict:
        """Requests of ctx_32k tokens submitted together into a pool of pool_tokens KV slots
        (the rest of the pool is held back); the most of them decoding at once."""
        s = self.scale
        modes = ["none", "calidrop"] if self.flux else ["none"]
        pool = self.sched.kv_cache_manager.block_pool
        bs = self.info["block_size"]
        res = {}
        for mode in modes:
            self.abort_all()
            target = s.pool_tokens // bs
            held = pool.get_new_blocks(pool.get_num_free_blocks() - target)
            n = s.capacity_requests if mode != "none" else 3
            p = self.params(mode, 4096 if s == GPU else 1024)
            for i in range(n):
                self.add(prompt_ids(s.ctx_32k, SEED + 500 + i, s.vocab), p)
            t0 = time.perf_counter()
            peak = {"decoding": 0}
            timeline = []
            last_change, step = 0, 0
            limit = 90.0 if mode != "none" else 20.0
            while time.perf_counter() - t0 < limit:
                self.engine.step()
                step += 1
                dec = sum(1 for r in self.sched.running
                          if r.num_computed_tokens >= r.num_prompt_tokens)
                row = {"t": round(time.perf_counter() - t0, 3), "running": len(self.sched.running),
                       "decoding": dec, "waiting": len(self.sched.waiting),
                       "free_blocks": self.free_blocks()}
                if dec > peak["decoding"]:
                    peak = dict(row)
                    last_change = step
                if not timeline or (row["decoding"], row["running"]) != \
                        (timeline[-1]["decoding"], timeline[-1]["running"]):
                    timeline.append(row)
                if dec == n or (step - last_change > 400 and dec > 0):
                    break
            gauges = self._gauges()
            self.abort_all()
            pool.free_blocks(held)
            res[mode] = {"pool_blocks": target, "requests": n, "peak": peak,
                         "elapsed_s": time.perf_counter() - t0, "timeline": timeline[-40:],
                         "gauges_at_end": gauges}
        return res

    def _gauges(self) -> dict:
        out = {}
        try:
            for m in self.engine.get_metrics():
                if m.name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                              "vllm:num_requests_waiting", "vllm:num_preemptions"):
                    out[m.name] = getattr(m, "value", None)
        except Exception as exc:  # metrics are a bonus here, never a reason to fail a job
            out["error"] = repr(exc)
        return out

    def metrics_text(self) -> str:
        try:
            from prometheus_client import REGISTRY, generate_latest
        except ImportError:
            return ""
        lines = generate_latest(REGISTRY).decode().splitlines()
        return "\n".join(x for x in lines if x.startswith("fluxserve:"))


def run_engine(spec: dict, result_path: Path) -> None:
    result = {"spec": spec, "jobs": {}, "errors": {}}

    def save() -> None:
        result_path.write_text(json.dumps(result, indent=1, default=str))

    deadline = time.time() + spec.get("budget_s", 1e9)
    try:
        eng = Engine(spec)
    except Exception:
        result["errors"]["start"] = traceback.format_exc()
        save()
        raise
    result["info"] = eng.info
    save()
    for job in spec["jobs"]:
        if time.time() > deadline:
            result["errors"][job] = "skipped: out of time"
            continue
        t0 = time.perf_counter()
        try:
            result["jobs"][job] = getattr(eng, f"job_{job}")()
        except Exception:
            result["errors"][job] = traceback.format_exc()
            try:
                eng.abort_all()
            except Exception:
                pass
        result.setdefault("job_s", {})[job] = time.perf_counter() - t0
        if eng.flux:
            result["metrics"] = eng.metrics_text()
        save()
        print(f"[{spec['name']}] {job} done in {time.perf_counter() - t0:.1f} s", flush=True)
    # vLLM's in-process engine keeps worker threads; leave without waiting on them
    sys.stdout.flush()
    os._exit(0)


# ----------------------------------------------------------------------------- driver
def engine_specs(args, model: Path, scale: Scale, device: str,
                 router: Path | None = None, workdir: Path | None = None) -> list[dict]:
    jobs_all = [j for j in args.jobs.split(",") if j]
    specs = []
    for name in [n for n in args.engines.split(",") if n]:
        jobs = jobs_all
        if name == "flux-eager":
            jobs = ["check"]
        if name == "flux-tp2":
            jobs = [j for j in jobs_all if j in ("check", "ttft_short", "decode_short")] or \
                ["check"]
        specs.append({"name": name, "kind": name.replace("-tp2", ""), "model": str(model),
                      "scale": asdict(scale), "device": device, "jobs": jobs,
                      "tp": 2 if name == "flux-tp2" else 1, "budget_s": args.budget_s,
                      "calidrop_b32": args.calidrop_b32,
                      "distinct_contexts": args.distinct_contexts,
                      "router": str(router) if router else None,
                      "trace": str(workdir / f"{name}.trace.jsonl") if workdir else None})
    return specs


def child_env(spec: dict, gpus: list[str]) -> dict:
    env = dict(os.environ)
    env.update({"VLLM_USE_FLASHINFER_SAMPLER": "0", "PYTHONUNBUFFERED": "1",
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine core: scheduler access
                "TOKENIZERS_PARALLELISM": "false", "NCCL_NVLS_ENABLE": "0",
                "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
    if spec["kind"] == "stock":
        env["VLLM_PLUGINS"] = "none"  # no fluxserve plugin: stock vLLM
    else:
        env.pop("VLLM_PLUGINS", None)
        env["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # as `fluxserve serve` sets it on CUDA
        if spec.get("trace"):
            from attention_backends.flux.request_state import TRACE_ENV

            env[TRACE_ENV] = spec["trace"]
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    elif spec["tp"] > 1:  # vLLM CPU: one core per rank, bound by hand (see ENVIRONMENT notes)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(spec["tp"])))
    return env


def schedule(specs: list[dict], gpus: list[str], workdir: Path, log, on_result=None) -> dict:
    """Run the engine children in order, each once enough GPUs are free for it (several at a
    time on several GPUs); ``on_result(results)`` after each one ends."""
    pending = list(specs)
    running: dict[str, tuple[subprocess.Popen, list[str], float]] = {}
    free = list(gpus) if gpus else ["cpu"]
    results = {}
    while pending or running:
        # strictly in order: an engine starts once enough GPUs are free for it
        while pending and len(free) >= (pending[0]["tp"] if gpus else 1):
            spec = pending.pop(0)
            need = spec["tp"] if gpus else 1
            take, free = free[:need], free[need:]
            path = workdir / f"{spec['name']}.json"
            cmd = [sys.executable, os.path.abspath(__file__), "engine", "--spec",
                   json.dumps(spec), "--result", str(path)]
            proc = subprocess.Popen(cmd, env=child_env(spec, take if gpus else []),
                                    stdout=log, stderr=subprocess.STDOUT)
            running[spec["name"]] = (proc, take, time.time())
            print(f"started {spec['name']} on {take}", flush=True)
        time.sleep(1)
        for name, (proc, take, t0) in list(running.items()):
            if proc.poll() is not None:
                print(f"{name} exited {proc.returncode} after {time.time() - t0:.0f} s",
                      flush=True)
                free += take
                del running[name]
                path = workdir / f"{name}.json"
                results[name] = json.loads(path.read_text()) if path.exists() else \
                    {"errors": {"start": f"no result, exit code {proc.returncode}"}}
                results[name]["exit_code"] = proc.returncode
                if on_result is not None:
                    on_result(results)
    return results


# ----------------------------------------------------------------------------- comparison
def compare(ref: dict, new: dict) -> dict:
    """Per request: leading tokens equal, first-token top-5 logprob gap, and at the first
    differing token the reference's margin between its top two candidates (a near tie there
    means bf16 rounding picked the other one)."""
    rows = []
    for key, a in ref.items():
        b = new.get(key)
        if b is None:
            continue
        ta, tb = a["tokens"], b["tokens"]
        n = min(len(ta), len(tb))
        same = next((i for i in range(n) if ta[i] != tb[i]), n)
        la, lb = dict(a["logprobs"][0]) if a["logprobs"] else {}, \
            dict(b["logprobs"][0]) if b["logprobs"] else {}
        common = set(la) & set(lb)
        d0 = max((abs(la[t] - lb[t]) for t in common), default=float("nan"))
        dmax = 0.0
        for i in range(same):  # chosen-token logprob along the common prefix
            pa, pb = dict(a["logprobs"][i]), dict(b["logprobs"][i])
            if ta[i] in pa and ta[i] in pb:
                dmax = max(dmax, abs(pa[ta[i]] - pb[ta[i]]))
        margin = None
        if same < n:
            top = a["logprobs"][same]
            margin = top[0][1] - top[1][1] if len(top) > 1 else None
        rows.append({"key": key, "n": n, "equal_prefix": same, "first_top5_dlogprob": d0,
                     "max_chosen_dlogprob": dmax, "ref_margin_at_divergence": margin})
    return {"requests": len(rows), "all_equal": sum(r["equal_prefix"] == r["n"] for r in rows),
            "max_first_dlogprob": max((r["first_top5_dlogprob"] for r in rows), default=0),
            "max_chosen_dlogprob": max((r["max_chosen_dlogprob"] for r in rows), default=0),
            "max_margin_at_divergence": max((r["ref_margin_at_divergence"] for r in rows
                                             if r["ref_margin_at_divergence"] is not None),
                                            default=None),
            "rows": rows}


def by_mode(check: dict, modes: list[str]) -> dict:
    """The requests of a check result whose mode is in ``modes`` (single and mixed)."""
    out = {}
    for part in ("single", "short", "mixed"):
        for key, v in check.get(part, {}).items():
            if key.split(":")[-1] in modes:
                out[f"{part}/{key}"] = v
    return out


def summarize(results: dict) -> tuple[dict, list[str]]:
    lines = []
    summary: dict = {"engines": {}}
    for name, r in results.items():
        summary["engines"][name] = {"info": r.get("info"), "errors": {
            k: v.strip().splitlines()[-1] for k, v in r.get("errors", {}).items()},
            "job_s": r.get("job_s")}
    chk = {n: r.get("jobs", {}).get("check") for n, r in results.items()}
    comps = {}
    if chk.get("stock") and chk.get("flux"):
        comps["flux none+full vs stock"] = compare(by_mode(chk["stock"], ["none", "full"]),
                                                   by_mode(chk["flux"], ["none", "full"]))
    if chk.get("flux") and chk.get("flux-eager"):
        for mode in CHECK_MODES:
            comps[f"flux graphs vs eager: {mode}"] = compare(by_mode(chk["flux-eager"], [mode]),
                                                             by_mode(chk["flux"], [mode]))
    if chk.get("flux") and chk.get("flux-piecewise"):
        comps["flux FULL vs piecewise graphs"] = compare(
            by_mode(chk["flux-piecewise"], CHECK_MODES), by_mode(chk["flux"], CHECK_MODES))
    if chk.get("flux") and chk.get("flux-tp2"):
        comps["flux TP2 vs TP1"] = compare(by_mode(chk["flux"], CHECK_MODES),
                                           by_mode(chk["flux-tp2"], CHECK_MODES))
    summary["comparisons"] = comps
    for n, c in chk.items():
        if c and "auto_requests" in c:
            lines.append(f"{n}: auto requests routed {c.get('auto_routed', 0)} of "
                         f"{c['auto_requests']} (short prompts run without CUDA graphs); "
                         f"ranks {c.get('ranks_seen')} agree: {c.get('ranks_agree')}")
    if comps:
        lines.append("correctness (greedy, 24 tokens alone / 4-44 tokens in a 64-request mixed "
                     "batch; logprob diffs in nats)")
        lines.append(f"{'pair':34s} {'reqs':>4s} {'equal':>5s} {'dlp first':>9s} "
                     f"{'dlp max':>8s} {'margin@div':>10s}")
        for k, c in comps.items():
            m = c["max_margin_at_divergence"]
            lines.append(f"{k:34s} {c['requests']:4d} {c['all_equal']:5d} "
                         f"{c['max_first_dlogprob']:9.3g} {c['max_chosen_dlogprob']:8.3g} "
                         f"{'-' if m is None else f'{m:.3g}':>10s}")
    tt = {n: r.get("jobs", {}).get("ttft") for n, r in results.items()}
    if any(tt.values()):
        lines.append("TTFT, s (32K: second of two runs)")
        for n, t in tt.items():
            if t:
                lines.append(f"  {n:10s} " + "  ".join(f"{k}={v['ttft_s']:.2f}"
                                                       for k, v in t.items()))
    dd = {n: r.get("jobs", {}).get("decode") for n, r in results.items()}
    if any(dd.values()):
        lines.append("decode at 32K context: TPOT ms (output tok/s)")
        for n, t in dd.items():
            if t:
                lines.append(f"  {n:10s} " + "  ".join(
                    f"{k}={v['tpot_ms']:.1f}({v['tok_s']:.0f})" for k, v in t.items()))
    cc = {n: r.get("jobs", {}).get("capacity") for n, r in results.items()}
    if any(cc.values()):
        lines.append("capacity: most 32K requests decoding at once in a fixed KV pool")
        for n, t in cc.items():
            for mode, v in (t or {}).items():
                lines.append(f"  {n:10s} {mode:9s} pool {v['pool_blocks']} blocks: "
                             f"{v['peak']['decoding']} of {v['requests']} "
                             f"(free blocks then {v['peak'].get('free_blocks')})")
    for name, s in summary["engines"].items():
        info = s["info"] or {}
        lines.append(f"{name}: start {info.get('start_s', 0):.0f} s, cudagraph "
                     f"{info.get('cudagraph_mode')}, backend {info.get('attention_backend')}, "
                     f"V2 runner {info.get('v2_model_runner')}; errors: "
                     f"{s['errors'] or 'none'}")
    return summary, lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command")
    e = sub.add_parser("engine")
    e.add_argument("--spec", required=True)
    e.add_argument("--result", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_serving_out")))
    ap.add_argument("--engines", default="stock,flux,flux-eager")
    ap.add_argument("--jobs", default="check,ttft,decode,capacity,profile")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    ap.add_argument("--gpus", default=None, help="GPU ids to use (default: all visible)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="per engine: skip jobs that would start after this many seconds")
    ap.add_argument("--calidrop-b32", action="store_true",
                    help="also time calidrop at 32 streams (32 full 32K prefills)")
    ap.add_argument("--distinct-contexts", action="store_true",
                    help="decode streams with contexts of their own (one full prefill each) "
                         "instead of one shared prefix")
    ap.add_argument("--prior", type=Path, action="append", default=[],
                    help="results JSON of an earlier run to compare with (e.g. flux TP1)")
    args = ap.parse_args(argv)
    if args.command == "engine":
        run_engine(json.loads(args.spec), args.result)
        return

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_serving_{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    scale = TINY if args.tiny else GPU
    model = write_model(work / "model", scale)
    check = mode_options(scale, check=True)["sparse"]["flux"]
    router = write_router(work / "router", scale, check["sink"], check["window"])
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpus = (args.gpus.split(",") if args.gpus else
            [str(i) for i in range(torch.cuda.device_count())]) if device == "cuda" else []
    specs = engine_specs(args, model, scale, device, router, work)
    t0 = time.time()
    prior = {}
    for path in args.prior:
        prior.update(json.loads(path.read_text()).get("results", {}))

    def write(results: dict) -> list[str]:
        # after every engine, so that a run stopped at its time limit keeps what finished
        return report(args.out, scale, {**prior, **results}, time.time() - t0)

    with open(args.out / "engines.log", "ab") as log:
        results = schedule(specs, gpus, work, log, on_result=write)
    print("\n".join(write(results)))


def report(out: Path, scale: Scale, results: dict, wall_s: float) -> list[str]:
    results = json.loads(json.dumps(results, default=str))  # a copy we may trim
    summary, lines = summarize(results)
    profiles = []
    for name, r in results.items():
        for k, v in (r.get("jobs", {}).get("profile") or {}).items():
            profiles.append(f"== {name} {k}: TPOT {v['tpot_ms']:.2f} ms\n{v.pop('profile', '')}")
        for v in (r.get("jobs", {}).get("decode") or {}).values():
            v.pop("profile", None)
    (out / "profiles.txt").write_text("\n\n".join(profiles))
    metrics = [f"== {n}\n{r.get('metrics', '')}" for n, r in results.items() if r.get("metrics")]
    (out / "metrics.txt").write_text("\n\n".join(metrics))
    (out / "gpu_serving.json").write_text(json.dumps(
        {"scale": asdict(scale), "wall_s": wall_s, "summary": summary, "results": results},
        indent=1, default=str))
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
