"""Optional API-key authentication, as a FastAPI dependency on the /v1 routes."""

from __future__ import annotations

import secrets
from http import HTTPStatus

from fastapi import HTTPException, Request


async def require_api_key(request: Request) -> None:
    keys: tuple[str, ...] = request.app.state.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(HTTPStatus.UNAUTHORIZED,
                            "Missing API key: send 'Authorization: Bearer <key>'.",
                            headers={"WWW-Authenticate": "Bearer"})
    if not any(secrets.compare_digest(token.strip(), key) for key in keys):
        raise HTTPException(HTTPStatus.UNAUTHORIZED, "Invalid API key.",
                            headers={"WWW-Authenticate": "Bearer"})
