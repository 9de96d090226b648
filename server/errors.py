"""Every error the server answers, in the OpenAI error shape
``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status.

vLLM's handlers (``init_exception_handler``) cover validation and vLLM's own errors; this module
adds what they miss: Starlette's own HTTP errors (404 unknown path, 405 wrong method, 400 body
parse errors such as invalid UTF-8), the headers an HTTPException carries (``Allow``,
``Retry-After``, ``Connection: close``), and engine failures, which name their cause instead of
vLLM's "see stack trace above". Validation errors are located as the API names the fields
before vLLM's handler turns the first one into `param` (``kv_policy.window``, not the pydantic
location ``kv_policy.snapkv.window`` of the policy union).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine, Iterable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send
from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse
from vllm.entrypoints.serve.exception_handling.handlers.validation import (
    validation_exception_handler,
)
from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
from vllm.entrypoints.serve.exception_handling.utils import sanitize_message
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from kv_policies.eviction.options import api_errors
from server.schemas import REQUEST_ID_MAX_LENGTH, REQUEST_ID_PATTERN


def error_payload(status: int, message: str, *, err_type: str | None = None,
                  param: str | None = None) -> dict:
    """The OpenAI error body for ``status`` (an HTTP status code). ``err_type`` defaults to the
    status phrase ("Not Found"), as in vLLM's own error bodies."""
    return ErrorResponse(error=ErrorInfo(
        message=sanitize_message(message), type=err_type or HTTPStatus(status).phrase,
        param=param, code=status)).model_dump()


def error_response(status: int, message: str, *, err_type: str | None = None,
                   param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_payload(status, message, err_type=err_type, param=param),
                        status_code=status, headers=headers)


async def send_error(send: Send, status: int, message: str, *, err_type: str | None = None,
                     headers: Iterable[tuple[str, str]] = ()) -> None:
    """Answer an error from raw ASGI code (middlewares that run outside the routes)."""
    body = json.dumps(error_payload(status, message, err_type=err_type)).encode()
    raw_headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def sse_error_event(status: int, message: str, *, err_type: str | None = None) -> bytes:
    """The end of a stream that fails after its 200: an error event, then ``[DONE]`` (the shape
    vLLM's streams use for errors that happen mid-stream)."""
    data = json.dumps(error_payload(status, message, err_type=err_type))
    return f"data: {data}\n\ndata: [DONE]\n\n".encode()


async def http_exception_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def request_validation_handler(request: Request, exc: RequestValidationError
                                     ) -> JSONResponse:
    errors = exc.errors()
    # pydantic's documentation link says nothing about the request (FastAPI drops it from the
    # body's own errors; errors of values validated by hand may still carry it)
    located = api_errors([{k: v for k, v in e.items() if k != "url"}
                          for e in errors if isinstance(e, dict)])
    # a plain-string error (raised by hand, not by pydantic) has no location to rewrite
    return await validation_exception_handler(request, RequestValidationError(
        [*located, *(e for e in errors if not isinstance(e, dict))], body=exc.body))


# A JSON string escape of a UTF-16 surrogate; unpaired, Python's json module still decodes it
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate_at(value: Any) -> tuple | None:
    """The location of the first string (key or value) in a decoded JSON value that holds a
    lone surrogate, so is not Unicode text (it cannot be encoded, or tokenized); None if none."""
    todo: list[tuple[tuple, Any]] = [((), value)]
    while todo:
        loc, node = todo.pop()
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError:
                    return loc
        elif isinstance(node, dict):
            todo.extend(((*loc, key), key) for key in node)
            todo.extend(((*loc, key), item) for key, item in node.items())
        elif isinstance(node, list):
            todo.extend(((*loc, i), item) for i, item in enumerate(node))
    return None


class UnicodeJSONRequest(Request):
    """A request whose JSON body must be Unicode text: a string holding an unpaired
    ``\\ud800``-``\\udfff`` escape is a JSON decode error (400 naming where it is), as in
    pydantic's own JSON parser, instead of reaching the tokenizer (which failed with
    "TextEncodeInput must be Union[...]")."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            value = json.loads(body)
            escape = _SURROGATE_ESCAPE.search(body)
            loc = _lone_surrogate_at(value) if escape else None
            if loc is not None:
                where = ".".join(str(part) for part in ("body", *loc))
                raise json.JSONDecodeError(
                    f"{where} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without "
                    "its pair), which is not Unicode text", body.decode(), escape.start())
            self._json = value
        return self._json


class UnicodeJSONRoute(APIRoute):
    """Route class of the JSON-body routes: their handler reads a ``UnicodeJSONRequest``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            return await handler(UnicodeJSONRequest(request.scope, request.receive))

        return route_handler


async def require_json_body(request: Request) -> None:
    """Route dependency: the body must be declared ``application/json`` (415 otherwise, as
    the request was not sent as JSON at all; a JSON body that does not parse is a 400)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise HTTPException(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"Unsupported Media Type {media_type or '(none)'!r}: send the body as JSON with "
            "'Content-Type: application/json'.")


# vLLM messages about a request field that do not begin with the field's name
_VLLM_MESSAGE_FIELDS = (
    (re.compile(r"^Token id -?\d+ is out of vocabulary"), ("prompt", "messages")),
    (re.compile(r"specified as bad|^Too many bad words"), ("bad_words",)),
)
# "min_tokens must be ...", "`thinking_token_budget` must be ...": the field is the first word
_LEADING_FIELD = re.compile(r"^`?([a-z_]+)`?[ =]")


def locate_vllm_error(error: str | BaseException, request_model: type[BaseModel]
                      ) -> str | None:
    """The request field a vLLM 400 that names none (`param: null`) is about, or None.

    ``error``: the exception, or its message as the error body has it; ``request_model``: the
    request's model, whose fields the answer is one of. A chat template's refusal (raised from
    a ``jinja2.TemplateError``) is about `messages`.
    """
    fields = request_model.model_fields
    if isinstance(error, BaseException):
        cause: BaseException | None = error
        while cause is not None:
            if any(cls.__name__ == "TemplateError" for cls in type(cause).__mro__):
                return "messages" if "messages" in fields else None
            cause = cause.__cause__ or cause.__context__
        error = str(error.args[0]) if error.args else str(error)
    for pattern, names in _VLLM_MESSAGE_FIELDS:
        if pattern.search(error):
            return next((name for name in names if name in fields), None)
    match = _LEADING_FIELD.match(error)
    if match and match.group(1) in fields:
        return match.group(1)
    return None


async def require_valid_request_id_header(request: Request) -> None:
    """Route dependency: an ``X-Request-Id`` header, which vLLM uses as the request id (over the
    body's `request_id`) and echoes in the response `id`, obeys the body field's bounds (400)."""
    value = request.headers.get("x-request-id")
    if value is not None and not (len(value) <= REQUEST_ID_MAX_LENGTH
                                  and re.match(REQUEST_ID_PATTERN, value)):
        raise HTTPException(
            HTTPStatus.BAD_REQUEST,
            f"The X-Request-Id header must be 1 to {REQUEST_ID_MAX_LENGTH} visible ASCII "
            f"characters (no spaces or control characters); got {len(value)} characters.")


async def engine_error_handler(request: Request, exc: EngineDeadError | EngineGenerateError
                               ) -> JSONResponse:
    engine = request.app.state.engine
    if isinstance(exc, EngineDeadError) or not engine.alive:
        # The engine is gone for every request, and the process is about to exit (see
        # server.lifecycle): retrying elsewhere is the client's remedy.
        return error_response(HTTPStatus.SERVICE_UNAVAILABLE, engine.dead_message(),
                              err_type="EngineDeadError")
    return error_response(HTTPStatus.INTERNAL_SERVER_ERROR,
                          f"The engine failed this request: {exc}", err_type="EngineGenerateError")


def install_error_handlers(app: FastAPI) -> None:
    init_exception_handler(app)
    # Starlette's routing raises its own HTTPException (404, 405) and FastAPI raises one for
    # bodies it cannot parse; vLLM registers FastAPI's subclass only, and drops the headers.
    app.exception_handler(StarletteHTTPException)(http_exception_handler)
    app.exception_handler(HTTPException)(http_exception_handler)
    app.exception_handler(RequestValidationError)(request_validation_handler)
    app.exception_handler(EngineDeadError)(engine_error_handler)
    app.exception_handler(EngineGenerateError)(engine_error_handler)
