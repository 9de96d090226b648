"""The FastAPI application: routes, error handling, and the engine's lifespan."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from vllm.entrypoints.serve.exception_handling.register import init_exception_handler

from server import __version__
from server.admission import AdmissionControl
from server.config import ServerSettings
from server.engine import EngineState, start_engine, stop_engine
from server.reward.engine import RewardEngineState, schedule_start, stop_reward_engine
from server.routes import openai, ops, reward


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.engine.start_task = asyncio.create_task(start_engine(app, app.state.args))
    schedule_start(app)  # the reward model's engine, if any (/v1/reward scalar mode)
    try:
        yield
    finally:
        await stop_reward_engine(app)
        await stop_engine(app)


def build_app(args: argparse.Namespace, settings: ServerSettings,
              reward_engine: RewardEngineState | None = None) -> FastAPI:
    app = FastAPI(
        title="fluxserve",
        version=__version__,
        summary="OpenAI-compatible long-context LLM serving on vLLM.",
        lifespan=lifespan,
    )
    app.state.args = args  # vLLM's serving and error-handling code reads its options here
    app.state.settings = settings
    app.state.engine = EngineState()
    app.state.reward_engine = reward_engine  # None: no reward model (scalar mode answers 400)
    # vLLM's handlers turn validation errors, HTTP errors and engine errors into OpenAI error
    # bodies ({"error": {"message", "type", "param", "code"}}) with the right status.
    init_exception_handler(app)
    app.add_middleware(AdmissionControl, max_in_flight=settings.max_in_flight_requests)
    app.include_router(ops.router)
    app.include_router(openai.router)
    app.include_router(reward.router)
    return app
