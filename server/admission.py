"""Admission control for the generation routes: a bound on the requests in flight (429 beyond
it), 503 with ``Retry-After`` while the server drains, and the cut of the requests still running
when the drain timeout ends (see ``server.lifecycle``).

An ASGI middleware rather than a route dependency, because a streamed response outlives its
route handler: the slot is held until the last byte is sent or the client goes away.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import send_error, sse_error_event
from server.lifecycle import Lifecycle
from server.metrics import REJECTED

# limited path -> the endpoint label the generation routes use in their metrics
LIMITED_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
                 "/v1/reward": "reward"}
RETRY_AFTER_S = "1"
CLIENT_CLOSED_REQUEST = 499  # counted as a disconnect, not a rejection


class RejectionCounter:
    """``fluxserve:requests_rejected_total{endpoint, status}``: every error status a generation
    or reward route answers, whichever layer answered it (transport limit, auth, admission,
    request validation, vLLM's serving layer). Outermost, so that it sees them all."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = LIMITED_PATHS.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                if status >= 400 and status != CLIENT_CLOSED_REQUEST:
                    REJECTED.labels(endpoint, str(status)).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class AdmissionControl:
    def __init__(self, app: ASGIApp, max_in_flight: int, lifecycle: Lifecycle) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.lifecycle = lifecycle

    @property
    def in_flight(self) -> int:
        return len(self.lifecycle.in_flight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in LIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining:
            await self._reject(scope, send, HTTPStatus.SERVICE_UNAVAILABLE,
                               "The server is shutting down and accepts no new requests. Retry "
                               "on another replica.", "ServiceUnavailableError")
            return
        if 0 < self.max_in_flight <= self.in_flight:
            await self._reject(scope, send, HTTPStatus.TOO_MANY_REQUESTS,
                               f"Server busy: {self.max_in_flight} generation requests are in "
                               "flight (--max-in-flight-requests). Retry later.",
                               "rate_limit_exceeded")
            return
        task = asyncio.current_task()
        assert task is not None
        self.lifecycle.in_flight.add(task)
        try:
            await self._serve(scope, receive, send, task)
        finally:
            self.lifecycle.in_flight.discard(task)
            self.lifecycle.cut.discard(task)

    async def _serve(self, scope: Scope, receive: Receive, send: Send,
                     task: asyncio.Task) -> None:
        started = complete = stream = False

        async def tracked_send(message: Message) -> None:
            nonlocal started, complete, stream
            if message["type"] == "http.response.start":
                started = True
                stream = any(name == b"content-type" and value.startswith(b"text/event-stream")
                             for name, value in message.get("headers", []))
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except asyncio.CancelledError:
            if task not in self.lifecycle.cut:
                raise
            # The drain cut this request (the cancellation has aborted its engine request);
            # end its response with an error the client can see.
            task.uncancel()
            if complete:
                return
            message = self.lifecycle.cut_message()
            if not started:
                await send_error(send, HTTPStatus.SERVICE_UNAVAILABLE, message,
                                 err_type="ServiceUnavailableError",
                                 headers=[("retry-after", RETRY_AFTER_S)])
            elif stream:
                await send({"type": "http.response.body", "more_body": False,
                            "body": sse_error_event(HTTPStatus.SERVICE_UNAVAILABLE, message,
                                                    err_type="ServiceUnavailableError")})
            else:  # a JSON body half sent cannot carry an error; end it
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _reject(self, scope: Scope, send: Send, status: HTTPStatus, message: str,
                      err_type: str) -> None:
        await send_error(send, status, message, err_type=err_type,
                         headers=[("retry-after", RETRY_AFTER_S)])
