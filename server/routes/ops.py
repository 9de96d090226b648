"""Operational endpoints: liveness, readiness, Prometheus metrics. Never behind the API key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.engine import EngineState
from server.metrics import render_latest

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness: the process is up and its engine has not died")
async def health(request: Request) -> JSONResponse:
    engine: EngineState = request.app.state.engine
    failure = engine.failure()
    if failure is not None:
        return JSONResponse({"status": "dead", "error": failure}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready", summary="Readiness: the engine is up and serving, and the server is not "
                              "draining")
async def ready(request: Request) -> JSONResponse:
    engine: EngineState = request.app.state.engine
    if not engine.alive:
        return JSONResponse({"status": "dead", "error": engine.failure()}, status_code=503)
    if request.app.state.lifecycle.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not engine.ready:
        return JSONResponse({"status": "starting"}, status_code=503)
    return JSONResponse({
        "status": "ready",
        "unfinished_requests": engine.client.get_num_unfinished_requests(),
    })


@router.get("/metrics", summary="Prometheus metrics (vLLM's and fluxserve's)")
async def metrics() -> Response:
    body, content_type = render_latest()
    return Response(content=body, media_type=content_type)
