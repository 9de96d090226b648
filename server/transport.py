"""Limits on what one client can make the HTTP front end hold: request-body size, the time to
send request headers, idle keep-alive time, and the number of open connections.

- ``BodySizeLimit`` (ASGI middleware) answers 413 when a body is larger than the limit: at once
  from ``Content-Length``, and otherwise while the body streams in (chunked transfer encoding, or
  a Content-Length that understates nothing but grows past the limit), so no more than the limit
  plus one network read is ever buffered.
- ``LimitedHttpToolsProtocol`` (uvicorn's httptools protocol, passed as ``http=``) closes a
  connection whose request headers are not complete within the header timeout (slowloris), from
  the moment it is accepted or a request's first byte arrives: a connection that never sends a
  byte is closed too. A request head larger than vLLM's ``--h11-max-incomplete-event-size`` or
  with more headers than ``--h11-max-header-count`` gets 431 (uvicorn applies those two to its
  h11 protocol only). Beyond ``max_connections`` open connections a new one gets 503 and is
  closed. Its parse errors answer in the OpenAI error shape instead of uvicorn's plain text.
  Idle keep-alive connections are closed by uvicorn's own ``timeout_keep_alive``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from vllm.entrypoints.launchers.utils.constants import (
    H11_MAX_HEADER_COUNT_DEFAULT,
    H11_MAX_INCOMPLETE_EVENT_SIZE_DEFAULT,
)

from server.errors import error_payload, send_error


@dataclass(frozen=True)
class TransportLimits:
    """The front end's transport limits (one CLI flag each, see ``server.config``)."""

    max_request_body_bytes: int = 64 << 20
    header_timeout_s: float = 20.0
    keep_alive_timeout_s: int = 5
    max_connections: int = 2048
    # vLLM's --h11-max-incomplete-event-size and --h11-max-header-count, applied to httptools
    max_header_bytes: int = H11_MAX_INCOMPLETE_EVENT_SIZE_DEFAULT
    max_header_count: int = H11_MAX_HEADER_COUNT_DEFAULT


def _too_large(limit: int) -> str:
    return (f"Request body too large: the limit is {limit} bytes (--max-request-body-bytes). "
            "Send a smaller body.")


class BodySizeLimit:
    """Reject request bodies above ``max_bytes`` with 413 (OpenAI error shape,
    ``Connection: close`` so the rest of the body is not read)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await send_error(send, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                 _too_large(self.max_bytes), headers=[("connection", "close")])
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body read; the HTTPException handler answers it.
                    raise HTTPException(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                        _too_large(self.max_bytes),
                                        headers={"Connection": "close"})
            return message

        await self.app(scope, limited_receive, send)


def _raw_error(status: HTTPStatus, message: str, extra_headers: tuple[bytes, ...] = ()) -> bytes:
    body = json.dumps(error_payload(status, message)).encode()
    head = [STATUS_LINE[status.value], b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n", *extra_headers,
            b"connection: close\r\n\r\n"]
    return b"".join(head) + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header-read timeout and a connection bound. The limits
    come from ``config.transport_limits`` (set by ``server.cli``)."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        limits: TransportLimits = getattr(config, "transport_limits", TransportLimits())
        self.header_timeout_s = limits.header_timeout_s
        self.max_connections = limits.max_connections
        self.max_header_bytes = limits.max_header_bytes
        self.max_header_count = limits.max_header_count
        self._header_timer: asyncio.TimerHandle | None = None
        self._head_bytes: int | None = None  # bytes of the request head so far, while reading it
        self._head_count = 0
        self._head_too_large: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections > 0 and len(self.connections) > self.max_connections:
            self.logger.warning("refusing a connection: %d open (--max-connections)",
                                len(self.connections) - 1)
            transport.write(_raw_error(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"Too many open connections (the limit is {self.max_connections}, "
                "--max-connections). Retry later.", (b"retry-after: 1\r\n",)))
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_bytes is not None:
            if self._head_bytes > self.max_header_bytes > 0:
                self._head_too_large = (f"Request head larger than {self.max_header_bytes} "
                                        "bytes (--h11-max-incomplete-event-size).")
                self.send_400_response("")
                return
            self._head_bytes += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes, self._head_count = 0, 0
        self._arm_header_timer()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_count += 1
        if self._head_count > self.max_header_count > 0:
            self._head_too_large = (f"More than {self.max_header_count} request headers "
                                    "(--h11-max-header-count).")
            raise ValueError(self._head_too_large)  # stops the parser: send_400_response runs
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        self._head_bytes = None
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large is not None:
            response = _raw_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, self._head_too_large)
        else:
            response = _raw_error(HTTPStatus.BAD_REQUEST, msg)
        self._cancel_header_timer()
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and self.header_timeout_s > 0:
            self._header_timer = self.loop.call_later(self.header_timeout_s,
                                                      self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None
                                           and not self.cycle.response_complete):
            return
        self.transport.write(_raw_error(
            HTTPStatus.REQUEST_TIMEOUT,
            f"Request headers not received within {self.header_timeout_s:g} s "
            "(--http-header-timeout)."))
        self.transport.close()
