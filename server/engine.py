"""The vLLM engine behind the server: started in the background so that /health answers at once
and /ready turns 200 only when the engine can serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from dataclasses import dataclass, field

from fastapi import FastAPI
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.launchers.api_server.app_state import init_app_state
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.async_llm import AsyncLLM

from kv_policies.vllm_glue import engine as kv_engine
from server import warmup
from server.accounting import RequestAccountant, attention_shape

logger = logging.getLogger("fluxserve.engine")


class FluxAsyncLLM(AsyncLLM):
    """vLLM's ``AsyncLLM`` whose ``generate`` calls are observed by ``server.accounting`` (the
    outputs pass through unchanged; the per-request accounting is computed when each request
    finishes)."""

    _accountant: RequestAccountant | None = None

    @property
    def accountant(self) -> RequestAccountant:
        if self._accountant is None:
            # the engine's reports are relayed by fluxserve's scheduler only
            ours = self.vllm_config.scheduler_config.scheduler_cls in (
                kv_engine.SCHEDULER_CLS, kv_engine.ASYNC_SCHEDULER_CLS)
            self._accountant = RequestAccountant(attention_shape(self.model_config), ours)
        return self._accountant

    def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        outputs = super().generate(prompt, sampling_params, request_id, *args, **kwargs)
        return self.accountant.observe(outputs, request_id, sampling_params)


@dataclass
class EngineState:
    client: AsyncLLM | None = None
    ready: bool = False
    error: str | None = None
    start_task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.error is None and not (self.client is not None and self.client.errored)

    def failure(self) -> str | None:
        """Why the engine is dead (None while it is alive): the start error, or how the engine
        core process ended."""
        if self.error is None and self.client is not None and self.client.errored:
            self.error = death_reason(self.client)
        return self.error

    def dead_message(self) -> str:
        return (f"The inference engine is dead ({self.failure() or 'stopped'}); this server is "
                "exiting so that it is restarted. Retry the request.")


def death_reason(client: AsyncLLM) -> str:
    """How the engine core ended, read from its process exit status where there is one."""
    manager = getattr(client.engine_core.resources, "engine_manager", None)
    for proc in getattr(manager, "processes", None) or []:
        code = proc.exitcode
        if code is None:
            continue
        if code < 0:
            return f"engine core process {proc.name} was killed by {signal.Signals(-code).name}"
        return (f"engine core process {proc.name} exited with status {code}; "
                "its traceback is in the server log")
    return "the engine core failed; its traceback is in the server log"


def install_extensions(vllm_config) -> None:
    """Wire fluxserve's engine-side pieces that are chosen by configuration, not by the plugin."""
    scheduler = vllm_config.scheduler_config
    if scheduler.scheduler_cls is None:
        # The KV-policy scheduler hands each request's eviction plan to the KV-cache manager,
        # which frees the evicted blocks; requests without a policy schedule exactly as before.
        scheduler.scheduler_cls = kv_engine.scheduler_cls(bool(scheduler.async_scheduling))
    else:
        logger.warning("custom --scheduler-cls %s: kv_policy eviction will not free KV blocks",
                       scheduler.scheduler_cls)


async def start_engine(app: FastAPI, args: argparse.Namespace) -> None:
    """Build the AsyncLLM (engine core in its own process) and vLLM's OpenAI serving state."""
    state: EngineState = app.state.engine
    try:
        engine_args = AsyncEngineArgs.from_cli_args(args)
        usage = UsageContext.OPENAI_API_SERVER
        # Both calls block for seconds (config loading; engine-core start and profiling):
        # run them off the event loop so /health keeps answering meanwhile.
        vllm_config = await asyncio.to_thread(engine_args.create_engine_config, usage)
        install_extensions(vllm_config)
        state.client = await asyncio.to_thread(
            FluxAsyncLLM.from_vllm_config,
            vllm_config=vllm_config,
            usage_context=usage,
            enable_log_requests=engine_args.enable_log_requests,
            disable_log_stats=engine_args.disable_log_stats,
        )
        supported_tasks = await state.client.get_supported_tasks()
        await init_app_state(state.client, app.state, args, supported_tasks)
        settings = app.state.settings
        if warmup.enabled(settings.warmup):
            await warmup.warm_up(state.client, settings.router_available)
        state.ready = True
        logger.info("engine ready: serving %s", ", ".join(args.served_model_name or [args.model]))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a server whose engine cannot start must not linger half-alive:
        # the watchdog (server.lifecycle) sees the error and ends the process with status 1
        state.error = f"engine failed to start: {type(exc).__name__}: {exc}"
        logger.exception("engine failed to start")


async def stop_engine(app: FastAPI) -> None:
    await shutdown_engine(app.state.engine)


async def shutdown_engine(state: EngineState) -> None:
    """Stop an engine that is starting or serving (its start cancelled, its client shut down)."""
    state.ready = False
    if state.start_task is not None and not state.start_task.done():
        state.start_task.cancel()
    if state.client is not None:
        await asyncio.to_thread(state.client.shutdown)
        state.client = None
