"""Bad input gets an OpenAI error body with a 4xx status, never a 500 or a hang; auth."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e

OK_MESSAGES = [{"role": "user", "content": "hi"}]


def _chat(**overrides):
    return {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 4, **overrides}


BAD_REQUESTS = {
    "wrong type for messages": (_chat(messages="hi"), 400, "messages"),
    "wrong type for temperature": (_chat(temperature="hot"), 400, "temperature"),
    "empty messages": (_chat(messages=[]), 400, "messages"),
    "negative max_tokens": (_chat(max_tokens=-1), 400, "max_tokens"),
    "zero max_tokens": (_chat(max_tokens=0), 400, "max_tokens"),
    "oversized max_tokens": (_chat(max_tokens=10**6), 400, "max_tokens"),
    "prompt longer than the model": (_chat(messages=[{"role": "user", "content": "x " * 5000}]),
                                     400, "maximum context length"),
    "unknown model": (_chat(model="no-such-model"), 404, "does not exist"),
    "unknown kv policy": (_chat(kv_policy={"name": "bogus"}), 400, "kv_policy"),
    "unknown kv policy field": (_chat(kv_policy={"name": "snapkv", "budgett": 3}), 400, "budgett"),
    "kv window not below budget": (_chat(kv_policy={"name": "snapkv", "budget": 8, "window": 8}),
                                   400, "window"),
    "unknown flux field": (_chat(flux={"mode": "full", "foo": 1}), 400, "foo"),
    "unknown flux mode": (_chat(flux={"mode": "half"}), 400, "mode"),
    "flux auto without router": (_chat(flux={"mode": "auto"}), 400, "router"),
    "flux layers out of range": (_chat(flux={"mode": "layers", "sparse_layers": [0, 99]}), 400,
                                 "out of range"),
}


def _assert_openai_error(resp: httpx.Response, status: int, needle: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert error["code"] == status
    assert needle.lower() in (error["message"] + str(error["param"])).lower(), error


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_chat_requests_get_openai_errors(server, case):
    body, status, needle = BAD_REQUESTS[case]
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=server.auth,
                      timeout=60)
    _assert_openai_error(resp, status, needle)


def test_malformed_json(server):
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", content=b'{"model": ',
                      headers={**server.auth, "content-type": "application/json"}, timeout=30)
    _assert_openai_error(resp, 400, "json")


def test_bad_completion_request(server):
    resp = httpx.post(f"{server.base_url}/v1/completions",
                      json={"model": MODEL, "prompt": "x", "max_tokens": -5},
                      headers=server.auth, timeout=30)
    _assert_openai_error(resp, 400, "max_tokens")


def test_server_still_serves_after_bad_requests(server):
    r = server.client().chat.completions.create(model=MODEL, messages=OK_MESSAGES, max_tokens=3)
    assert r.choices[0].message.content is not None


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "Basic abc"}])
def test_missing_or_wrong_api_key_is_401(server, headers):
    for method, path, body in [("POST", "/v1/chat/completions", _chat()),
                               ("GET", "/v1/models", None)]:
        resp = httpx.request(method, f"{server.base_url}{path}", json=body, headers=headers,
                             timeout=30)
        _assert_openai_error(resp, 401, "api key")


def test_openai_client_with_wrong_key_raises_authentication_error(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_operational_endpoints_need_no_key(server, path):
    assert httpx.get(f"{server.base_url}{path}", timeout=30).status_code == 200
