"""Start-up warm-up: before ``/ready`` turns 200, run a few short requests down every attention
path the request options can select, so that the first user request of any mode costs what
later ones do.

On the GPU, our attention runs Triton kernels that compile on first use (4-9 s per mode on the
H200, docs/benchmarks.md "Serving on the H200"), and cuDNN builds a plan per new prompt shape.
Warm-up pays that at start-up instead. The requests cover, for each flux mode (``full``,
``sparse``, ``layers`` with half the layers sparse) and each KV policy (with a budget that
compresses): a prompt longer than the sink + window and than one prefill chunk (so the masks
bite and chunks over a cached prefix run), all submitted together (mixed prefill/decode batches
of many rows), then one short prompt per case alone (single-row batches).

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
    long, short = prompt_lengths(model.max_model_len,
                                 client.vllm_config.scheduler_config.max_num_batched_tokens)
    vocab = model.get_vocab_size()
    todo = cases(model.get_num_layers(client.vllm_config.parallel_config), router)
    start = time.perf_counter()
    await asyncio.gather(*(
        _run(client, f"fluxserve-warmup-long-{c.name}", _prompt(long, vocab, i),
             _params(c, long)) for i, c in enumerate(todo)))
    for i, c in enumerate(todo):
        await _run(client, f"fluxserve-warmup-short-{c.name}",
                   _prompt(short, vocab, len(todo) + i), _params(c, short))
    await client.reset_prefix_cache()
    took = time.perf_counter() - start
    logger.info("warm-up: %d cases (%s), prompts of %d and %d tokens, %.1f s",
                len(todo), ", ".join(c.name for c in todo), long, short, took)
    return took
