"""Admission control: a bound on the generation requests in flight, answered with 429 beyond it.

An ASGI middleware rather than a route dependency, because a streamed response outlives its
route handler: the slot is held until the last byte is sent or the client goes away.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from starlette.types import ASGIApp, Receive, Scope, Send

from server.metrics import REJECTED

# limited path -> the endpoint label the generation routes use in their metrics
LIMITED_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
                 "/v1/reward": "reward"}


class AdmissionControl:
    def __init__(self, app: ASGIApp, max_in_flight: int) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limited = (scope["type"] == "http" and self.max_in_flight > 0
                   and scope["path"] in LIMITED_PATHS)
        if not limited:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            await self._reject(scope, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _reject(self, scope: Scope, send: Send) -> None:
        status = HTTPStatus.TOO_MANY_REQUESTS
        REJECTED.labels(LIMITED_PATHS[scope["path"]], str(status.value)).inc()
        body = json.dumps({"error": {
            "message": f"Server busy: {self.max_in_flight} generation requests are in flight "
                       "(--max-in-flight-requests). Retry later.",
            "type": "rate_limit_exceeded", "param": None, "code": status.value,
        }}).encode()
        await send({"type": "http.response.start", "status": status.value,
                    "headers": [(b"content-type", b"application/json"),
                                (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body})
