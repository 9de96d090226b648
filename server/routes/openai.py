"""OpenAI-compatible endpoints. Rendering, tokenization, sampling and streaming are vLLM's own
serving classes; this module adds fluxserve's per-request options, auth and readiness checks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import TypeAdapter, ValidationError
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.tokenize.protocol import TokenizeRequest
from vllm.entrypoints.serve.utils.api_utils import with_cancellation
from vllm.exceptions import VLLMValidationError

from attention_backends.flux.options import FluxOptions
from kv_policies.eviction.options import parse_kv_policy
from server.accounting import ResponseUsage, collect_usage
from server.auth import require_api_key
from server.config import ServerSettings
from server.engine import EngineState
from server.errors import (
    UnicodeJSONRoute,
    error_payload,
    error_response,
    locate_vllm_error,
    require_json_body,
    require_valid_request_id_header,
)
from server.metrics import DISCONNECTED, REQUESTS
from server.reward.engine import reward_model_cards
from server.schemas import ChatRequest, CompletionsRequest, integral_floats_to_ints
from server.structured_outputs import check_structured_outputs


async def require_ready(request: Request) -> None:
    engine: EngineState = request.app.state.engine
    if not engine.alive:
        raise HTTPException(HTTPStatus.SERVICE_UNAVAILABLE, engine.dead_message())
    if not engine.ready:
        raise HTTPException(HTTPStatus.SERVICE_UNAVAILABLE,
                            "The engine is still starting; retry when /ready returns 200.",
                            headers={"Retry-After": "5"})


router = APIRouter(dependencies=[Depends(require_api_key), Depends(require_ready)],
                   route_class=UnicodeJSONRoute)

ERROR_RESPONSES = {
    code.value: {"model": ErrorResponse}
    for code in (HTTPStatus.BAD_REQUEST, HTTPStatus.UNAUTHORIZED, HTTPStatus.NOT_FOUND,
                 HTTPStatus.UNSUPPORTED_MEDIA_TYPE, HTTPStatus.SERVICE_UNAVAILABLE)
}


def _model_limits(request: Request) -> tuple[int, int]:
    """(max_model_len, num_layers) of the served model."""
    cfg = request.app.state.engine.client.model_config
    return int(cfg.max_model_len), int(cfg.hf_text_config.num_hidden_layers)


def _invalid(loc: tuple, message: str, value: object) -> dict:
    return {"type": "value_error", "loc": ("body", *loc), "msg": message, "input": value}


# Extra args that vLLM itself reads as objects (KV/EC connector parameters); `vllm_xargs` can
# only carry strings, numbers and lists, which vLLM's output processor then fails on.
_VLLM_OBJECT_XARGS = ("kv_transfer_params", "ec_transfer_params")


_JSON = TypeAdapter(Any)


def _xarg_value(raw: object) -> object:
    """A `vllm_xargs` value: JSON text parsed (a `json_invalid` ValidationError otherwise), with
    integral floats as integers as in the request body (`integral_floats_to_ints`)."""
    return integral_floats_to_ints(_JSON.validate_json(raw)) if isinstance(raw, str | bytes) \
        else raw


def _options_from_xargs(body: ChatRequest | CompletionsRequest) -> tuple[list[dict], set[str]]:
    """Validate `flux` / `kv_policy` sent inside `vllm_xargs` (vLLM's free-form extra args,
    which reach the engine as-is) with the same models as the top-level fields, and move them
    there; refuse the keys vLLM reads as objects. Returns the validation errors, located under
    `vllm_xargs`, and the keys moved."""
    xargs = getattr(body, "vllm_xargs", None)  # /v1/reward items have none
    moved: set[str] = set()
    if not xargs:
        return [], moved
    errors: list[dict] = [
        _invalid(("vllm_xargs", key), f"vllm_xargs.{key} is reserved: send the top-level "
                                      f"`{key}` object", xargs[key])
        for key in _VLLM_OBJECT_XARGS if key in xargs]
    for key, parse in (("flux", FluxOptions.model_validate), ("kv_policy", parse_kv_policy)):
        if key not in xargs:
            continue
        raw = xargs.pop(key)
        loc = ("vllm_xargs", key)
        if getattr(body, key) is not None:
            errors.append(_invalid(loc, f"{key} is sent twice (top level and in vllm_xargs); "
                                        "send it once, as the top-level field", raw))
            continue
        try:
            opts = parse(_xarg_value(raw))
        except ValidationError as exc:
            errors.extend({**e, "loc": ("body", *loc, *e["loc"])}
                          for e in exc.errors(include_url=False))
            continue
        setattr(body, key, opts)
        moved.add(key)
    return errors, moved


def apply_policies(body: ChatRequest | CompletionsRequest, request: Request) -> None:
    """Check the request's `flux` / `kv_policy` against the served model, fill the server
    defaults, and reject what the engine cannot do.

    Raises ``RequestValidationError`` (400, `param` = the field) for an option past its
    model-dependent bound (docs/request_options.md); ``HTTPException`` 400 for `flux.mode=auto`
    without a router.
    """
    errors, from_xargs = _options_from_xargs(body)
    max_model_len, num_layers = _model_limits(request)
    checks = []
    if body.flux is not None:
        checks.append(("flux", body.flux.model_limit_errors(max_model_len, num_layers)))
    if body.kv_policy is not None:
        checks.append(("kv_policy", body.kv_policy.model_limit_errors(max_model_len)))
    for key, found in checks:
        prefix = ("vllm_xargs", key) if key in from_xargs else (key,)
        opts = getattr(body, key)
        errors.extend(_invalid((*prefix, name), msg, getattr(opts, name)) for name, msg in found)
    if errors:
        raise RequestValidationError(errors)
    # Server defaults (CLI options) are not checked against the model here: a request that sent
    # no option must not be refused for the operator's choice. The worker ignores out-of-range
    # layers, and a budget past the prompt leaves it untouched.
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


def check_prompt_token_ids(body: ChatRequest | CompletionsRequest, renderer) -> None:
    """Token-id prompts must be in the served model's vocabulary (``renderer``: vLLM's, whose
    ``validate_token_ids`` the engine applies too, but without naming the field, and only once
    a stream has had its 200). Raises ``VLLMValidationError`` (400, `param`: `prompt`)."""
    prompt = getattr(body, "prompt", None)
    if not isinstance(prompt, list) or not prompt or isinstance(prompt[0], str):
        return
    for ids in prompt if isinstance(prompt[0], list) else [prompt]:
        renderer.validate_token_ids(ids, parameter="prompt")


async def _generate(body: ChatRequest | CompletionsRequest, raw_request: Request,
                    endpoint: str, create):
    """Run one generation request through vLLM's serving class and shape its response."""
    apply_policies(body, raw_request)
    if isinstance(body, CompletionsRequest):
        check_prompt_token_ids(body, raw_request.app.state.openai_serving_completion.renderer)
    # before admission: a streamed request must not get its 200 before the constraint is known
    # to be servable
    check_structured_outputs(body, raw_request.app.state.engine.client)
    streamed = str(bool(body.stream)).lower()
    try:
        with collect_usage() as usage:
            result = await create(body, raw_request)
    except asyncio.CancelledError:  # with_cancellation: the client left before the reply
        DISCONNECTED.labels(endpoint, streamed).inc()
        raise
    except VLLMValidationError as exc:  # vLLM's request checks, some without their field
        if exc.parameter is None:
            exc.parameter = locate_vllm_error(exc, type(body))
        raise
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        # vLLM caught the cancellation (after aborting the engine request) and answered
        # "Client disconnected"; nobody is there to read it, and it is no rejection
        DISCONNECTED.labels(endpoint, streamed).inc()
        raise asyncio.CancelledError
    engine: EngineState = raw_request.app.state.engine
    if isinstance(result, ErrorResponse):
        if result.error.code >= 500 and not engine.alive:
            # vLLM's "EngineCore encountered an issue. See stack trace (above)" names no cause
            return error_response(HTTPStatus.SERVICE_UNAVAILABLE, engine.dead_message(),
                                  err_type="EngineDeadError")
        if result.error.param is None and result.error.code == HTTPStatus.BAD_REQUEST:
            result.error.param = locate_vllm_error(result.error.message, type(body))
        return JSONResponse(result.model_dump(), status_code=result.error.code)
    REQUESTS.labels(endpoint, body.flux.mode, body.kv_policy.name).inc()
    echo_only = isinstance(body, CompletionsRequest) and body.echo_only
    if hasattr(result, "model_dump"):
        payload = result.model_dump()
        if echo_only:
            _count_no_generated_tokens(payload)
        _add_accounting(payload, usage)
        return JSONResponse(payload)
    if echo_only:
        result = _echo_only_events(result)
    result = _accounting_events(result, usage)
    return StreamingResponse(_count_disconnect(result, endpoint, engine, type(body)),
                             media_type="text/event-stream")


def _add_accounting(payload: dict, usage: ResponseUsage) -> None:
    """`usage.fluxserve` (server.accounting) into a response or final stream chunk's usage."""
    fluxserve = usage.to_usage()
    if fluxserve is not None and payload.get("usage"):
        payload["usage"]["fluxserve"] = fluxserve


async def _accounting_events(events: AsyncGenerator[str, None], usage: ResponseUsage
                             ) -> AsyncGenerator[str, None]:
    """Add `usage.fluxserve` to the final usage chunk (`choices: []`, sent with
    `stream_options.include_usage`), which vLLM sends after every request finished; the chunks
    before it pass through untouched."""
    try:
        async for event in events:
            if event.startswith("data: {") and '"choices":[]' in event and '"usage"' in event:
                payload = json.loads(event[len("data: "):])
                _add_accounting(payload, usage)
                event = f"data: {json.dumps(payload)}\n\n"
            yield event
    finally:
        await events.aclose()


def _count_no_generated_tokens(payload: dict) -> None:
    """vLLM serves `echo` with `max_tokens: 0` by generating one token and dropping it, and
    still counts it in `usage`; nothing was returned, so nothing is counted."""
    usage = payload.get("usage")
    if usage:
        usage["completion_tokens"] = 0
        usage["total_tokens"] = usage["prompt_tokens"]


async def _echo_only_events(events: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
    try:
        async for event in events:
            if event.startswith("data: {") and '"usage"' in event:
                payload = json.loads(event[len("data: "):])
                _count_no_generated_tokens(payload)
                event = f"data: {json.dumps(payload)}\n\n"
            yield event
    finally:
        await events.aclose()


async def _count_disconnect(events: AsyncGenerator[str, None], endpoint: str,
                            engine: EngineState, request_model: type
                            ) -> AsyncGenerator[str, None]:
    """Pass vLLM's SSE events through, counting streams the client dropped, naming the cause in
    the error event of a stream the engine's death ended, and the field in a request error the
    engine found without naming it. The cancellation that reaches vLLM's generator is what
    aborts the engine request."""
    try:
        async for event in events:
            if event.startswith('data: {"error"') and not engine.alive:
                event = "data: " + json.dumps(error_payload(
                    HTTPStatus.SERVICE_UNAVAILABLE, engine.dead_message(),
                    err_type="EngineDeadError")) + "\n\n"
            elif event.startswith('data: {"error"') and '"param":null' in event.replace(" ", ""):
                payload = json.loads(event[len("data: "):])
                error = payload["error"]
                if error.get("code") == HTTPStatus.BAD_REQUEST:
                    error["param"] = locate_vllm_error(error.get("message", ""), request_model)
                    event = f"data: {json.dumps(payload)}\n\n"
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        DISCONNECTED.labels(endpoint, "true").inc()
        raise
    finally:
        await events.aclose()


GENERATION_ROUTE = dict(
    dependencies=[Depends(require_json_body), Depends(require_valid_request_id_header)],
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


@router.post("/tokenize", dependencies=[Depends(require_json_body)],
             responses=ERROR_RESPONSES)
@with_cancellation
async def tokenize(body: TokenizeRequest, raw_request: Request) -> JSONResponse:
    """vLLM's tokenization endpoint (a ``prompt``, or chat ``messages`` rendered with the chat
    template): token ids, their count and the model's context length. `fluxserve eval` fits
    its prompts to exact lengths with it."""
    result = await raw_request.app.state.serving_tokenization.create_tokenize(body, raw_request)
    if isinstance(result, ErrorResponse):
        return JSONResponse(result.model_dump(), status_code=result.error.code)
    return JSONResponse(result.model_dump())
