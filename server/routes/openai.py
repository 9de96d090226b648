"""OpenAI-compatible endpoints. Rendering, tokenization, sampling and streaming are vLLM's own
serving classes; this module adds fluxserve's per-request options, auth and readiness checks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from http import HTTPStatus

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.utils.api_utils import validate_json_request, with_cancellation

from server.auth import require_api_key
from server.config import ServerSettings
from server.engine import EngineState
from server.metrics import DISCONNECTED, REJECTED, REQUESTS
from server.reward.engine import reward_model_cards
from server.schemas import ChatRequest, CompletionsRequest


async def require_ready(request: Request) -> None:
    engine: EngineState = request.app.state.engine
    if not engine.ready:
        raise HTTPException(HTTPStatus.SERVICE_UNAVAILABLE,
                            "The engine is still starting; retry when /ready returns 200.")


router = APIRouter(dependencies=[Depends(require_api_key), Depends(require_ready)])

ERROR_RESPONSES = {
    code.value: {"model": ErrorResponse}
    for code in (HTTPStatus.BAD_REQUEST, HTTPStatus.UNAUTHORIZED, HTTPStatus.NOT_FOUND,
                 HTTPStatus.SERVICE_UNAVAILABLE)
}


def _num_layers(request: Request) -> int:
    return request.app.state.engine.client.model_config.hf_text_config.num_hidden_layers


def apply_policies(body: ChatRequest | CompletionsRequest, request: Request) -> None:
    """Fill the server defaults for `flux` / `kv_policy` and reject what the engine cannot do."""
    settings: ServerSettings = request.app.state.settings
    if body.flux is None:
        body.flux = settings.default_flux
    if body.kv_policy is None:
        body.kv_policy = settings.default_kv_policy
    if body.flux.mode == "auto" and not settings.router_available:
        raise HTTPException(HTTPStatus.BAD_REQUEST,
                            "flux.mode='auto' needs a Flux router, and this server has none: serve "
                            "a Flux checkpoint or start it with --flux-router PATH; or send "
                            "flux.mode='full', 'sparse' or 'layers'.")
    if body.flux.sparse_layers:
        n = _num_layers(request)
        bad = [i for i in body.flux.sparse_layers if i >= n]
        if bad:
            raise HTTPException(HTTPStatus.BAD_REQUEST,
                                f"flux.sparse_layers {bad} out of range: the model has {n} layers.")


async def _generate(body: ChatRequest | CompletionsRequest, raw_request: Request,
                    endpoint: str, create):
    """Run one generation request through vLLM's serving class and shape its response."""
    apply_policies(body, raw_request)
    streamed = str(bool(body.stream)).lower()
    try:
        result = await create(body, raw_request)
    except asyncio.CancelledError:  # with_cancellation: the client left before the reply
        DISCONNECTED.labels(endpoint, streamed).inc()
        raise
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        # vLLM caught the cancellation (after aborting the engine request) and answered
        # "Client disconnected"; nobody is there to read it, and it is no rejection
        DISCONNECTED.labels(endpoint, streamed).inc()
        raise asyncio.CancelledError
    if isinstance(result, ErrorResponse):
        REJECTED.labels(endpoint, str(result.error.code)).inc()
        return JSONResponse(result.model_dump(), status_code=result.error.code)
    REQUESTS.labels(endpoint, body.flux.mode, body.kv_policy.name).inc()
    if hasattr(result, "model_dump"):
        return JSONResponse(result.model_dump())
    return StreamingResponse(_count_disconnect(result, endpoint), media_type="text/event-stream")


async def _count_disconnect(events: AsyncGenerator[str, None], endpoint: str
                            ) -> AsyncGenerator[str, None]:
    """Pass vLLM's SSE events through, counting streams the client dropped. The cancellation
    that reaches vLLM's generator is what aborts the engine request."""
    try:
        async for event in events:
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        DISCONNECTED.labels(endpoint, "true").inc()
        raise
    finally:
        await events.aclose()


GENERATION_ROUTE = dict(
    dependencies=[Depends(validate_json_request)],
    responses={HTTPStatus.OK.value: {"content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
)


@router.post("/v1/chat/completions", **GENERATION_ROUTE)
@with_cancellation
async def create_chat_completion(body: ChatRequest, raw_request: Request):
    serving = raw_request.app.state.openai_serving_chat
    return await _generate(body, raw_request, "chat", serving.create_chat_completion)


@router.post("/v1/completions", **GENERATION_ROUTE)
@with_cancellation
async def create_completion(body: CompletionsRequest, raw_request: Request):
    serving = raw_request.app.state.openai_serving_completion
    return await _generate(body, raw_request, "completions", serving.create_completion)


@router.get("/v1/models", responses=ERROR_RESPONSES)
async def list_models(raw_request: Request) -> JSONResponse:
    models = await raw_request.app.state.openai_serving_models.show_available_models()
    payload = models.model_dump()
    if raw_request.app.state.settings.smoke_test_model:
        for card in payload["data"]:
            card["owned_by"] = "fluxserve-smoke-test (random weights: output is meaningless)"
    payload["data"].extend(reward_model_cards(raw_request.app))  # /v1/reward's scalar scorer
    return JSONResponse(payload)
