"""Start-up warm-up: before ``/ready`` turns 200, run a few requests down every attention path
the request options can select, so that the first user request of any mode costs what later
ones do.

On the GPU, our attention runs Triton kernels that compile on first use (4-9 s per mode on the
H200, docs/benchmarks.md "Serving on the H200"), once per kernel configuration: the tuned
configuration depends on the mode and on size classes (a prefill chunk's query length, a decode
batch's row count), so each class compiles apart. cuDNN also builds a plan per new prompt shape.
Warm-up pays that at start-up instead. For each flux mode (``full``, ``sparse``, ``layers`` with
half the layers sparse, ``auto`` with a router) and each KV policy (with a budget that
compresses), in four phases (``plan``):

1. a prompt longer than the sink + window and than one prefill chunk, all cases together: the
   masks bite, small chunks run over a cached prefix, batches mix prefill and decode rows;
2. a prompt of two full chunks, each case alone: a full chunk over a full chunk's cached prefix
   (skipped when the model is too short for it);
3. one short prompt per case alone: single-row prefill and decode;
4. ``decode_batch`` short prompts per case together: the largest decode size class.

``--warmup auto`` (the default) warms up on CUDA and ROCm only: the CPU path compiles nothing.
The warm-up's requests (``fluxserve-warmup-*``) show in vLLM's own counters, not in fluxserve's;
the prefix cache is reset afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.v1.engine.async_llm import AsyncLLM

from attention_backends.flux.options import FluxOptions
from attention_backends.flux.router import DEFAULT_SINK, DEFAULT_WINDOW
from kv_policies.eviction.options import POLICY_NAMES, parse_kv_policy
from server.schemas import with_extensions

logger = logging.getLogger("fluxserve.warmup")

# Tokens decoded per warm-up request: enough for decode steps after the prompt
DECODE_TOKENS = 4
SHORT_PROMPT_TOKENS = 96
# Past sink + window and one prefill chunk, so every mask and the chunked path run
LONG_PROMPT_MARGIN = 512
# A KV policy's budget as a share of the prompt: every policy compresses
KV_BUDGET_FRACTION = 0.5
# Rows of the phase-4 decode batches: the largest decode size class of the tuned kernels
DECODE_BATCH = 32


def enabled(choice: str) -> bool:
    """Whether ``--warmup choice`` warms up on this platform."""
    if choice != "auto":
        return choice == "on"
    from vllm.platforms import current_platform
    return current_platform.is_cuda_alike()


@dataclass(frozen=True)
class WarmupCase:
    name: str
    flux: FluxOptions | None
    kv_policy: str | None = None  # None: no KV policy


def cases(num_layers: int, router: bool) -> list[WarmupCase]:
    """One case per flux mode (``auto`` when the server has a router) and per KV policy, and a
    sparse request that is also compressed."""
    half = list(range(num_layers // 2, num_layers)) or [0]
    out = [WarmupCase("none", None),
           WarmupCase("full", FluxOptions(mode="full")),
           WarmupCase("sparse", FluxOptions(mode="sparse")),
           WarmupCase("layers", FluxOptions(mode="layers", sparse_layers=half))]
    for policy in POLICY_NAMES:
        if policy != "none":
            out.append(WarmupCase(policy, None, policy))
    if "calidrop" in POLICY_NAMES:
        out.append(WarmupCase("sparse+calidrop", FluxOptions(mode="sparse"), "calidrop"))
    if router:
        out.append(WarmupCase("auto", FluxOptions(mode="auto")))
    return out


def prompt_lengths(max_model_len: int, max_num_batched_tokens: int) -> tuple[int, int]:
    """(long, short) prompt lengths in tokens that fit the model with the decoded tokens."""
    room = max_model_len - DECODE_TOKENS
    past = max(DEFAULT_SINK + DEFAULT_WINDOW, max_num_batched_tokens)
    long = min(room, past + LONG_PROMPT_MARGIN)
    return long, min(room, SHORT_PROMPT_TOKENS)


@dataclass(frozen=True)
class WarmupPlan:
    long: int  # phase 1 prompt length (tokens)
    chunked: int | None  # phase 2: two full chunks, or None when the model is too short
    short: int  # phases 3 and 4
    decode_batch: int  # phase 4 rows per case (1: no phase 4)

    def requests_per_case(self) -> int:
        return 2 + (self.chunked is not None) + (self.decode_batch if self.decode_batch > 1
                                                 else 0)


def plan(max_model_len: int, max_num_batched_tokens: int, max_num_seqs: int) -> WarmupPlan:
    """The warm-up's prompt lengths and batch size for a model and scheduler (all in tokens or
    rows, each within the model's length and the scheduler's limits)."""
    long, short = prompt_lengths(max_model_len, max_num_batched_tokens)
    chunked = min(max_model_len - DECODE_TOKENS, 2 * max_num_batched_tokens)
    return WarmupPlan(long, chunked if chunked > long else None, short,
                      max(1, min(DECODE_BATCH, max_num_seqs)))


def _params(case: WarmupCase, prompt_len: int) -> SamplingParams:
    params = SamplingParams(max_tokens=DECODE_TOKENS, ignore_eos=True, temperature=0.0)
    kv = None
    if case.kv_policy is not None:
        kv = parse_kv_policy({"name": case.kv_policy,
                              "budget": max(64, int(prompt_len * KV_BUDGET_FRACTION))})
    return with_extensions(params, case.flux, kv)


def _prompt(length: int, vocab_size: int, seed: int) -> TokensPrompt:
    # distinct prompts: no case reuses another's cached prefix
    return TokensPrompt(prompt_token_ids=[(seed * 7919 + 31 * i) % vocab_size
                                          for i in range(length)])


async def _run(client: AsyncLLM, request_id: str, prompt: TokensPrompt,
               params: SamplingParams) -> None:
    # AsyncLLM's own generate: warm-up requests stay out of fluxserve's per-request accounting
    async for _ in AsyncLLM.generate(client, prompt, params, request_id):
        pass


async def warm_up(client: AsyncLLM, router: bool) -> float:
    """Run the warm-up requests on ``client`` (``router``: the server serves ``flux.mode=auto``);
    returns the seconds it took.

    Raises whatever a warm-up request raises: a server whose attention paths fail must not turn
    ready."""
    model = client.model_config
    sched = client.vllm_config.scheduler_config
    p = plan(model.max_model_len, sched.max_num_batched_tokens, sched.max_num_seqs)
    vocab = model.get_vocab_size()
    todo = cases(model.get_num_layers(client.vllm_config.parallel_config), router)
    start = time.perf_counter()
    seed = iter(range(1 << 30))  # distinct prompts: no request reuses another's cached prefix
    await asyncio.gather(*(
        _run(client, f"fluxserve-warmup-long-{c.name}", _prompt(p.long, vocab, next(seed)),
             _params(c, p.long)) for c in todo))
    for c in todo:
        if p.chunked is not None:
            await _run(client, f"fluxserve-warmup-chunked-{c.name}",
                       _prompt(p.chunked, vocab, next(seed)), _params(c, p.chunked))
        await _run(client, f"fluxserve-warmup-short-{c.name}",
                   _prompt(p.short, vocab, next(seed)), _params(c, p.short))
        if p.decode_batch > 1:
            await asyncio.gather(*(
                _run(client, f"fluxserve-warmup-batch-{c.name}-{j}",
                     _prompt(p.short, vocab, next(seed)), _params(c, p.short))
                for j in range(p.decode_batch)))
    await client.reset_prefix_cache()
    took = time.perf_counter() - start
    logger.info("warm-up: %d cases (%s), prompts of %d and %d tokens%s, decode batches of %d, "
                "%d requests, %.1f s", len(todo), ", ".join(c.name for c in todo), p.long,
                p.short, f" and {p.chunked} alone" if p.chunked else "", p.decode_batch,
                p.requests_per_case() * len(todo), took)
    return took
