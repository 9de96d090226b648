"""Transport limits and framework errors on the real server (the shared session one, default
limits): a body over --max-request-body-bytes streamed in chunks gets 413, and the framework's
own errors answer in the OpenAI shape. The slow-header, keep-alive and connection-bound cases
run with short limits in tests/unit/test_transport.py."""

from __future__ import annotations

import httpx
import pytest

from server.transport import TransportLimits

pytestmark = pytest.mark.e2e


def _openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


def test_a_chunked_body_over_the_default_limit_gets_413(server):
    limit = TransportLimits().max_request_body_bytes
    chunk = b" " * (1 << 20)

    def body():  # a JSON object padded with whitespace, no Content-Length: chunked encoding
        yield b'{"model": "m", "prompt": "x", "pad": "'
        for _ in range(limit // len(chunk) + 2):
            yield chunk
        yield b'"}'

    resp = httpx.post(f"{server.base_url}/v1/completions", content=body(), timeout=60,
                      headers={**server.auth, "content-type": "application/json"})
    assert "--max-request-body-bytes" in _openai_error(resp, 413)["message"]
    # the server is unharmed
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200


def test_framework_errors_answer_in_the_openai_shape(server):
    _openai_error(httpx.get(f"{server.base_url}/v1/nope", headers=server.auth), 404)
    _openai_error(httpx.get(f"{server.base_url}/v1/completions", headers=server.auth), 405)
    _openai_error(httpx.post(f"{server.base_url}/v1/chat/completions",
                             content=b'{"model": "\xff"}',
                             headers={**server.auth, "content-type": "application/json"}), 400)
