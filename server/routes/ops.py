"""Operational endpoints: liveness, readiness, Prometheus metrics. Never behind the API key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.engine import EngineState
from server.metrics import render_latest
from server.reward.engine import RewardEngineState

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness: the process is up and its engine has not died")
async def health(request: Request) -> JSONResponse:
    engine: EngineState = request.app.state.engine
    reward: RewardEngineState | None = request.app.state.reward_engine
    if not engine.alive:
        return JSONResponse({"status": "dead", "error": engine.error}, status_code=503)
    if reward is not None and not reward.alive:
        return JSONResponse({"status": "dead", "error": f"reward engine: {reward.error}"},
                            status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready", summary="Readiness: the engine is up and serving")
async def ready(request: Request) -> JSONResponse:
    engine: EngineState = request.app.state.engine
    engines = [engine]
    reward: RewardEngineState | None = request.app.state.reward_engine
    if reward is not None:  # the reward model's engine must serve too
        engines.append(reward)
    if not all(e.ready and e.alive for e in engines):
        alive = all(e.alive for e in engines)
        return JSONResponse({"status": "starting" if alive else "dead"}, status_code=503)
    unfinished = [e.client.get_num_unfinished_requests() for e in engines]
    body = {"status": "ready", "unfinished_requests": sum(unfinished)}
    if reward is not None:
        body["reward_unfinished_requests"] = unfinished[1]
    return JSONResponse(body)


@router.get("/metrics", summary="Prometheus metrics (vLLM's and fluxserve's)")
async def metrics() -> Response:
    body, content_type = render_latest()
    return Response(content=body, media_type=content_type)
