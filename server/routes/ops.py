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
    failure = engine.failure()
    if failure is not None:
        return JSONResponse({"status": "dead", "error": failure}, status_code=503)
    reward: RewardEngineState | None = request.app.state.reward_engine
    failure = reward.failure() if reward is not None else None
    if failure is not None:
        return JSONResponse({"status": "dead", "error": f"reward engine: {failure}"},
                            status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready", summary="Readiness: the engine is up and serving, and the server is not "
                              "draining")
async def ready(request: Request) -> JSONResponse:
    engine: EngineState = request.app.state.engine
    reward: RewardEngineState | None = request.app.state.reward_engine
    engines = [engine] if reward is None else [engine, reward]  # the reward engine must serve too
    for e in engines:
        if not e.alive:
            prefix = "" if e is engine else "reward engine: "
            return JSONResponse({"status": "dead", "error": prefix + e.failure()},
                                status_code=503)
    if request.app.state.lifecycle.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not all(e.ready for e in engines):
        return JSONResponse({"status": "starting"}, status_code=503)
    unfinished = [e.client.get_num_unfinished_requests() for e in engines]
    body = {"status": "ready", "unfinished_requests": sum(unfinished)}
    if reward is not None:
        body["reward_unfinished_requests"] = unfinished[1]
    return JSONResponse(body)


@router.get("/metrics", summary="Prometheus metrics (vLLM's and fluxserve's)")
async def metrics() -> Response:
    body, content_type = render_latest()
    return Response(content=body, media_type=content_type)
