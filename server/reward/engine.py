"""The reward model's engine: a second vLLM `AsyncLLM`, in pooling mode, next to the chat engine.

It serves scalar scoring (`PoolingParams(task="classify")` on a `*ForSequenceClassification`
checkpoint). It starts in the background like the chat engine, so /health answers at once; /ready
turns 200 only when both engines serve. On CPU both engines start together; on an accelerator the
reward engine starts after the chat engine, whose memory profiling must not see a half-loaded
neighbour.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.async_llm import AsyncLLM

from server.engine import EngineState, shutdown_engine

logger = logging.getLogger("fluxserve.reward")

# CPU: the reward engine's KV cache when neither --reward-kv-cache-memory-bytes nor
# VLLM_CPU_KVCACHE_SPACE is given (the chat engine gets 2 GiB; see server/cli.py).
CPU_DEFAULT_REWARD_KV_CACHE_BYTES = 512 << 20
# Accelerators: the reward engine's share of device memory by default, and the most both engines
# may claim together (the chat engine's share is lowered to fit, with a warning).
DEFAULT_REWARD_GPU_MEMORY_UTILIZATION = 0.2
MAX_COMBINED_GPU_MEMORY_UTILIZATION = 0.95

AUTO, DEFAULT, NONE = "auto", "default", "none"


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fluxserve reward model (/v1/reward scalar mode)")
    group.add_argument(
        "--reward-model", type=str, default=AUTO,
        help="A *ForSequenceClassification checkpoint (local directory or hub id) for scalar "
             "scoring on /v1/reward; 'default': the embedded smoke-test reward model (random "
             "weights); 'none': no reward model (scalar mode answers 400); 'auto' (default): "
             "the embedded one when the chat model is the embedded smoke-test model, else none.")
    group.add_argument("--reward-model-name", type=str, default=None,
                       help="Name of the reward model in /v1/models and responses "
                            "(default: the path's last component).")
    group.add_argument("--reward-max-model-len", type=int, default=None,
                       help="Context length of the reward engine (default: the model's).")
    group.add_argument("--reward-gpu-memory-utilization", type=float, default=None,
                       help="Accelerator memory share of the reward engine (default "
                            f"{DEFAULT_REWARD_GPU_MEMORY_UTILIZATION}; the chat engine's "
                            "--gpu-memory-utilization is lowered so that both stay within "
                            f"{MAX_COMBINED_GPU_MEMORY_UTILIZATION}).")
    group.add_argument("--reward-kv-cache-memory-bytes", type=int, default=None,
                       help="KV-cache bytes of the reward engine (overrides the memory share; "
                            f"CPU default {CPU_DEFAULT_REWARD_KV_CACHE_BYTES >> 20} MiB).")


@dataclass(kw_only=True)
class RewardEngineState(EngineState):
    """The reward model's engine: the chat engine's state (liveness, why it died) plus what it
    serves."""

    model_path: str
    model_name: str
    smoke_test_model: bool = False


def resolve_reward_model(args: argparse.Namespace, *, chat_is_smoke_test: bool
                         ) -> RewardEngineState | None:
    """Decide which reward model to serve (None: none) and apply the memory defaults to ``args``.

    Generates the embedded reward model on first use.
    """
    choice = args.reward_model
    if choice == NONE or (choice == AUTO and not chat_is_smoke_test):
        return None
    if choice in (AUTO, DEFAULT):
        from server.reward.default_model import (
            DEFAULT_REWARD_MODEL_NAME,
            ensure_default_reward_model,
        )
        path, name, smoke = str(ensure_default_reward_model()), DEFAULT_REWARD_MODEL_NAME, True
        logger.warning("serving the embedded smoke-test reward model %s (random weights, "
                       "meaningless scores) from %s", name, path)
    else:
        path, smoke = choice, False
        name = Path(choice.rstrip("/")).name or choice
    _apply_memory_defaults(args)
    return RewardEngineState(model_path=path, model_name=args.reward_model_name or name,
                             smoke_test_model=smoke)


def _apply_memory_defaults(args: argparse.Namespace) -> None:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        if args.reward_kv_cache_memory_bytes is None \
                and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            args.reward_kv_cache_memory_bytes = CPU_DEFAULT_REWARD_KV_CACHE_BYTES
        return
    if args.reward_kv_cache_memory_bytes is not None:
        return
    if args.reward_gpu_memory_utilization is None:
        args.reward_gpu_memory_utilization = DEFAULT_REWARD_GPU_MEMORY_UTILIZATION
    room = MAX_COMBINED_GPU_MEMORY_UTILIZATION - args.reward_gpu_memory_utilization
    if args.kv_cache_memory_bytes is None and args.gpu_memory_utilization > room:
        logger.warning("lowering --gpu-memory-utilization from %.2f to %.2f to leave %.2f to the "
                       "reward engine", args.gpu_memory_utilization, room,
                       args.reward_gpu_memory_utilization)
        args.gpu_memory_utilization = room


def engine_args(args: argparse.Namespace, state: RewardEngineState) -> AsyncEngineArgs:
    """The reward engine's vLLM options: pooling runner; a few options follow the chat engine."""
    kwargs = dict(
        model=state.model_path,
        served_model_name=[state.model_name],
        runner="pooling",
        max_model_len=args.reward_max_model_len,
        enforce_eager=args.enforce_eager,
        trust_remote_code=args.trust_remote_code,
        dtype=args.dtype,
        seed=args.seed,
        # vLLM's Prometheus logger lives in the process-wide registry and unregisters every
        # `vllm:` series before registering its own: a second engine in this process would
        # replace (or, starting concurrently, collide with) the chat engine's series. The
        # reward engine therefore logs no vLLM stats; /v1/reward has its own fluxserve series.
        disable_log_stats=True,
        kv_cache_memory_bytes=args.reward_kv_cache_memory_bytes,
    )
    if args.reward_gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = args.reward_gpu_memory_utilization
    return AsyncEngineArgs(**kwargs)


async def start_reward_engine(app: FastAPI, after: asyncio.Task | None = None) -> None:
    """Build the reward `AsyncLLM`; when ``after`` is given, first wait for it (the chat engine's
    start). A reward engine that cannot start ends the process
    (``server.lifecycle.watch_engine``), as the chat engine does."""
    state: RewardEngineState = app.state.reward_engine
    try:
        if after is not None:
            await asyncio.shield(after)
            if not app.state.engine.ready:
                return
        usage = UsageContext.OPENAI_API_SERVER
        eargs = engine_args(app.state.args, state)
        vllm_config = await asyncio.to_thread(eargs.create_engine_config, usage)
        state.client = await asyncio.to_thread(
            AsyncLLM.from_vllm_config, vllm_config=vllm_config, usage_context=usage,
            disable_log_stats=eargs.disable_log_stats)
        tasks = await state.client.get_supported_tasks()
        if "classify" not in tasks:
            raise ValueError(f"reward model {state.model_path} supports {list(tasks)}, not "
                             "'classify': serve a *ForSequenceClassification checkpoint")
        state.ready = True
        logger.info("reward engine ready: serving %s", state.model_name)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        state.error = f"{type(exc).__name__}: {exc}"
        logger.exception("reward engine failed to start; shutting the server down")


async def stop_reward_engine(app: FastAPI) -> None:
    state: RewardEngineState | None = app.state.reward_engine
    if state is not None:
        await shutdown_engine(state)


def schedule_start(app: FastAPI) -> None:
    """Start the reward engine in the background (after the chat engine off CPU)."""
    state: RewardEngineState | None = app.state.reward_engine
    if state is None:
        return
    from vllm.platforms import current_platform

    after = None if current_platform.is_cpu() else app.state.engine.start_task
    state.start_task = asyncio.create_task(start_reward_engine(app, after))


def reward_model_cards(app: FastAPI) -> list[dict]:
    """`/v1/models` entries for the reward model (empty without one)."""
    from vllm.entrypoints.serve.engine.protocol import ModelCard

    state: RewardEngineState | None = app.state.reward_engine
    if state is None:
        return []
    owner = ("fluxserve-smoke-test (random weights: scores are meaningless)"
             if state.smoke_test_model else "fluxserve")
    max_len = state.client.model_config.max_model_len if state.client is not None else None
    return [ModelCard(id=state.model_name, root=state.model_path, owned_by=owner,
                      max_model_len=max_len).model_dump()]
