"""`POST /v1/reward`: LongRM scalar and judge scoring (see server/reward/ and docs/reward.md)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from vllm.entrypoints.serve.engine.protocol import UsageInfo
from vllm.entrypoints.serve.utils.api_utils import with_cancellation

from server.admission import CLIENT_CLOSED_REQUEST
from server.auth import require_api_key
from server.errors import UnicodeJSONRoute, require_json_body
from server.metrics import DISCONNECTED
from server.reward import scoring
from server.reward.schemas import RewardRequest, RewardResponse
from server.routes.openai import ERROR_RESPONSES, require_ready

router = APIRouter(dependencies=[Depends(require_api_key), Depends(require_ready)],
                   route_class=UnicodeJSONRoute)


@router.post("/v1/reward", response_model=RewardResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json_body)],
             summary="Score candidate responses to a context (LongRM scalar or judge)")
async def create_reward(body: RewardRequest, raw_request: Request) -> Response:
    """Each item's candidates are scored by the reward model (`mode: scalar`) or compared by the
    chat model with LongRM's judge prompts (`mode: judge`). Errors use the OpenAI error shape."""
    response = await _score(body, raw_request)
    if response is None:
        # with_cancellation: the client went away and its engine requests were cancelled;
        # nobody reads this answer (499: client closed the request)
        DISCONNECTED.labels("reward", "false").inc()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return response


@with_cancellation
async def _score(body: RewardRequest, raw_request: Request) -> JSONResponse:
    prepared = await scoring.prepare(body.items, raw_request)
    data = await scoring.run(prepared, raw_request)
    prompt = sum(r.usage.prompt_tokens for r in data)
    completion = sum(r.usage.completion_tokens or 0 for r in data)
    response = RewardResponse(data=data, usage=UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion))
    return JSONResponse(response.model_dump())
