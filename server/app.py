"""The FastAPI application: routes, error handling, transport limits, and the lifespan that
starts and stops the engine and its watchdog."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import __version__
from server.admission import AdmissionControl, RejectionCounter
from server.config import ServerSettings
from server.engine import EngineState, start_engine, stop_engine
from server.errors import install_error_handlers
from server.lifecycle import Lifecycle, watch_engine
from server.reward.engine import RewardEngineState, schedule_start, stop_reward_engine
from server.routes import openai, ops, reward
from server.transport import BodySizeLimit


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.engine.start_task = asyncio.create_task(start_engine(app, app.state.args))
    watchdog = asyncio.create_task(watch_engine(app))
    schedule_start(app)  # the reward model's engine, if any (/v1/reward scalar mode)
    try:
        yield
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
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
    app.state.lifecycle = Lifecycle(drain_timeout_s=settings.drain_timeout_s)
    # Every error, the framework's own included, answers in the OpenAI error shape
    # ({"error": {"message", "type", "param", "code"}}) with the right status.
    install_error_handlers(app)
    # The middleware added last runs first: the body limit applies to every route, admission to
    # the generation routes only, and the rejection counter sees every answer of those.
    app.add_middleware(AdmissionControl, max_in_flight=settings.max_in_flight_requests,
                       lifecycle=app.state.lifecycle)
    app.add_middleware(BodySizeLimit, max_bytes=settings.transport.max_request_body_bytes)
    app.add_middleware(RejectionCounter)
    app.include_router(ops.router)
    app.include_router(openai.router)
    app.include_router(reward.router)
    return app
