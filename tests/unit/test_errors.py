"""Every error path of the HTTP front end, the framework's own included, answers in the OpenAI
error shape with the right status (no engine needed: the app runs without its lifespan)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from server.app import build_app
from server.cli import parse_args
from server.config import ServerSettings

KEY = "k"


@pytest.fixture(scope="module")
def app():
    args = parse_args(["serve", "--model", "/nonexistent"])
    app = build_app(args, ServerSettings(api_keys=(KEY,)))

    @app.get("/test/engine-dead")
    async def engine_dead():
        raise EngineDeadError()

    @app.get("/test/engine-generate-error")
    async def engine_generate_error():
        raise EngineGenerateError("request abc failed")

    return app


@pytest.fixture()
def client(app):
    return TestClient(app, raise_server_exceptions=False)


AUTH = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}


def _openai_error(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"]
    return error


def test_unknown_path_is_404(client):
    _openai_error(client.get("/v1/nope"), 404)


def test_wrong_method_is_405_with_allow(client):
    resp = client.get("/v1/chat/completions", headers=AUTH)
    _openai_error(resp, 405)
    assert resp.headers["allow"] == "POST"


@pytest.mark.parametrize("body", [
    b'{"model": "m", "messages": "\xff\xfe"}',  # invalid UTF-8
    b"[" * 100_000 + b"]" * 100_000,  # nested past the JSON parser's recursion limit
    b'{"model": ',  # truncated
])
def test_unparseable_bodies_are_400(client, body):
    _openai_error(client.post("/v1/chat/completions", content=body, headers=AUTH), 400)


def test_validation_errors_are_400_naming_the_field(app, client):
    app.state.engine.ready = True  # past the readiness check, to the body's validation
    try:
        error = _openai_error(client.post("/v1/completions", json={
            "model": "m", "prompt": "x", "max_tokens": "many"}, headers=AUTH), 400)
    finally:
        app.state.engine.ready = False
    assert "max_tokens" in error["param"]


def test_http_exceptions_from_dependencies_keep_their_status_and_headers(client):
    _openai_error(client.post("/v1/completions", json={"model": "m", "prompt": "x"}), 401)
    resp = client.post("/v1/completions", json={"model": "m", "prompt": "x"}, headers=AUTH)
    error = _openai_error(resp, 503)  # the engine is not started in this app
    assert "starting" in error["message"] and resp.headers["retry-after"] == "5"


def test_engine_errors_carry_their_cause(client):
    error = _openai_error(client.get("/test/engine-dead"), 503)
    assert "engine is dead" in error["message"] and "'State'" not in error["message"]
    error = _openai_error(client.get("/test/engine-generate-error"), 500)
    assert "request abc failed" in error["message"]


def test_health_and_ready_name_a_start_failure(app, client):
    app.state.engine.error = "engine failed to start: ValueError: no such model"
    try:
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json() == {"status": "dead", "error": app.state.engine.error}
        assert client.get("/ready").json()["status"] == "dead"
        error = _openai_error(client.post("/v1/completions", json={"model": "m", "prompt": "x"},
                                          headers=AUTH), 503)
        assert "no such model" in error["message"]
    finally:
        app.state.engine.error = None


class _Proc:
    def __init__(self, name: str, exitcode: int | None) -> None:
        self.name, self.exitcode = name, exitcode


class _Client:
    def __init__(self, *procs: _Proc) -> None:
        manager = type("Manager", (), {"processes": list(procs)})()
        resources = type("Resources", (), {"engine_manager": manager})()
        self.engine_core = type("Core", (), {"resources": resources})()
        self.errored = True


@pytest.mark.parametrize("procs, reason", [
    ((_Proc("EngineCore", -9),), "engine core process EngineCore was killed by SIGKILL"),
    ((_Proc("EngineCore_DP0", None), _Proc("EngineCore_DP1", 1)),
     "engine core process EngineCore_DP1 exited with status 1"),
    ((_Proc("EngineCore", None),), "the engine core failed"),
])
def test_death_reason_reads_the_engine_core_exit_status(procs, reason):
    from server.engine import EngineState

    state = EngineState(client=_Client(*procs))
    assert not state.alive
    assert state.failure().startswith(reason)
    assert reason in state.dead_message()


@pytest.fixture()
def ready(app):
    """Past the readiness check, to the body's validation (no engine runs here)."""
    app.state.engine.ready = True
    yield
    app.state.engine.ready = False


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/reward",
                                  "/tokenize"])
@pytest.mark.parametrize("content_type", ["text/plain", None, "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_body_not_sent_as_json_is_415(client, ready, path, content_type):
    headers = {"Authorization": f"Bearer {KEY}"}
    if content_type:
        headers["content-type"] = content_type
    error = _openai_error(client.post(path, content=b'{"model": "m"}', headers=headers), 415)
    assert "application/json" in error["message"]


def test_json_with_a_charset_is_json(client, ready):
    body = b'{"model": "m", "prompt": "a", "max_tokens": -1}'
    resp = client.post("/v1/completions", content=body,
                       headers={**AUTH, "content-type": "application/json; charset=utf-8"})
    assert _openai_error(resp, 400)["param"] == "body.max_tokens"


# Every field of both request models sent with each JSON type: vLLM's own before-validators read
# raw fields assuming their types (`messages` iterated, `structured_outputs.get`), which gave a
# 500 (AttributeError) or a 400 with Python's message and no `param` (TypeError).
WRONG_TYPES = [None, 1, "s", [], {}, [1], [None], True]
BASE_BODIES = {"/v1/chat/completions": {"model": "m", "max_tokens": 1,
                                        "messages": [{"role": "user", "content": "a"}]},
               "/v1/completions": {"model": "m", "prompt": "a", "max_tokens": 1}}


def _fields(path: str) -> list[str]:
    from server.schemas import ChatRequest, CompletionsRequest
    cls = ChatRequest if path == "/v1/chat/completions" else CompletionsRequest
    return sorted(cls.model_fields)


@pytest.mark.parametrize("path", list(BASE_BODIES))
def test_wrongly_typed_fields_are_400_naming_the_field(app, client, ready, path, monkeypatch):
    # the route itself is not under test (it needs an engine): a body that validates reaches it
    reached = []

    async def no_generation(body, raw_request, endpoint, create):
        reached.append(endpoint)
        return {}
    monkeypatch.setattr("server.routes.openai._generate", no_generation)
    for serving in ("openai_serving_chat", "openai_serving_completion"):
        monkeypatch.setattr(app.state, serving, SimpleNamespace(
            create_chat_completion=None, create_completion=None), raising=False)
    for field in _fields(path):
        for value in WRONG_TYPES:
            resp = client.post(path, json={**BASE_BODIES[path], field: value}, headers=AUTH)
            assert resp.status_code in (200, 400), (field, value, resp.text)
            assert (resp.status_code == 200) == bool(reached), (field, value, resp.text)
            reached.clear()
            if resp.status_code == 400:
                error = _openai_error(resp, 400)
                assert "object is not" not in error["message"], (field, value, error)
                assert "has no attribute" not in error["message"], (field, value, error)


@pytest.mark.parametrize("path,field,value", [
    ("/v1/chat/completions", "messages", None), ("/v1/chat/completions", "messages", 1),
    ("/v1/chat/completions", "structured_outputs", "s"),
    ("/v1/completions", "structured_outputs", []),
])
def test_fields_vllm_read_unchecked_are_located(client, ready, path, field, value):
    resp = client.post(path, json={**BASE_BODIES[path], field: value}, headers=AUTH)
    assert _openai_error(resp, 400)["param"] == f"body.{field}"


def test_every_error_answer_of_a_generation_route_is_counted(client, ready):
    """`fluxserve:requests_rejected_total` counts what any layer refused, not only the engine's
    refusals (validation errors, wrong media type, auth and body size used to be missing)."""
    from server.metrics import REJECTED

    def count(endpoint: str, status: int) -> float:
        return REJECTED.labels(endpoint, str(status))._value.get()

    cases = [  # (path, endpoint label, status, request)
        ("/v1/completions", "completions", 400,
         {"json": {"model": "m", "prompt": "a", "max_tokens": -1}, "headers": AUTH}),
        ("/v1/chat/completions", "chat", 400,
         {"json": {"model": "m", "messages": None}, "headers": AUTH}),
        ("/v1/chat/completions", "chat", 415,
         {"content": b"{}", "headers": {"Authorization": f"Bearer {KEY}"}}),
        ("/v1/reward", "reward", 401, {"json": {"items": []}}),
        ("/v1/reward", "reward", 400, {"json": {"items": []}, "headers": AUTH}),
    ]
    for path, endpoint, status, request in cases:
        before = count(endpoint, status)
        _openai_error(client.post(path, **request), status)
        assert count(endpoint, status) == before + 1, (path, status)
    before = count("chat", 404)
    client.get("/v1/models", headers=AUTH)  # not a generation route
    assert count("chat", 404) == before


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions",
     b'{"model": "m", "messages": [{"role": "user", "content": "a \\ud83d b"}]}'),
    ("/v1/completions", b'{"model": "m", "prompt": ["ok", "\\udc00"]}'),
    ("/v1/reward", b'{"items": [{"mode": "scalar", "candidates": ["a", "b"], '
                   b'"messages": [{"role": "user", "content": "\\uDBFF"}]}]}'),
    ("/v1/completions", b'{"model": "m", "prompt": "a", "\\ud800": 1}'),
])
def test_lone_surrogates_are_400_naming_where(client, ready, path, body):
    error = _openai_error(client.post(path, content=body, headers=AUTH), 400)
    assert "lone UTF-16 surrogate" in error["message"], error


def test_paired_and_escaped_surrogates_are_text(client, ready, monkeypatch):
    reached = []

    async def no_generation(body, raw_request, endpoint, create):
        reached.append(body.prompt)
        return {}
    monkeypatch.setattr("server.routes.openai._generate", no_generation)
    monkeypatch.setattr(client.app.state, "openai_serving_completion",
                        SimpleNamespace(create_completion=None), raising=False)
    body = b'{"model": "m", "prompt": ["\\ud83d\\ude00", "\\\\ud800"]}'  # an emoji; text "\ud800"
    resp = client.post("/v1/completions", content=body, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert reached == [["\U0001F600", "\\ud800"]]


# --- vLLM 400s that name no field: located -----------------------------------------------------

@pytest.mark.parametrize("message, model, param", [
    ("min_tokens must be less than or equal to max_tokens=4, got 9.", "chat", "min_tokens"),
    ("min_p must be in [0, 1], got 2.", "completions", "min_p"),
    ("`thinking_token_budget` must be a non-negative integer", "chat",
     "thinking_token_budget"),
    ("Token id 99999 is out of vocabulary", "completions", "prompt"),
    ("Token id -3 is out of vocabulary", "chat", "messages"),
    ("The model vocabulary size is 512, but the following tokens were specified as bad: [999]",
     "chat", "bad_words"),
    ("Too many bad words after tokenization: 9999. The max number is 128.", "chat",
     "bad_words"),
    ("Something else went wrong", "chat", None),
    ("model_name must be set", "chat", None),  # a first word that is no request field
])
def test_vllm_messages_are_located(message, model, param):
    from server.errors import locate_vllm_error
    from server.schemas import ChatRequest, CompletionsRequest
    cls = ChatRequest if model == "chat" else CompletionsRequest
    assert locate_vllm_error(message, cls) == param
    assert locate_vllm_error(VLLMValidationError(message), cls) == param


def test_a_chat_template_refusal_is_about_messages():
    import jinja2

    from server.errors import locate_vllm_error
    from server.schemas import ChatRequest, CompletionsRequest
    try:
        try:
            raise jinja2.TemplateError("Conversation roles must alternate user/assistant")
        except jinja2.TemplateError as cause:
            raise VLLMValidationError(str(cause)) from cause
    except VLLMValidationError as exc:
        assert locate_vllm_error(exc, ChatRequest) == "messages"
        assert locate_vllm_error(exc, CompletionsRequest) is None


class _Renderer:
    """vLLM's vocabulary check, on a 100-token vocabulary."""

    def validate_token_ids(self, ids, *, parameter=None):
        if min(ids) < 0 or max(ids) >= 100:
            raise VLLMValidationError("Token id is out of vocabulary", parameter=parameter)


@pytest.mark.parametrize("prompt, bad", [
    ([1, 2, 99], False), ([1, 100], True), ([[1], [2, 100]], True), ([[1], [99]], False),
    ("text", False), (["a", "b"], False),
])
def test_token_id_prompts_are_checked_against_the_vocabulary(prompt, bad):
    from server.routes.openai import check_prompt_token_ids
    from server.schemas import CompletionsRequest
    body = CompletionsRequest(model="m", prompt=prompt)
    if not bad:
        check_prompt_token_ids(body, _Renderer())
        return
    with pytest.raises(VLLMValidationError) as err:
        check_prompt_token_ids(body, _Renderer())
    assert err.value.parameter == "prompt"


@pytest.mark.parametrize("request_id", ["a" * 129, "a b", "caf\u00e9"])
def test_an_unsafe_x_request_id_header_is_400(client, ready, request_id):
    body = {"model": "m", "prompt": "a", "max_tokens": 1}
    headers = {**AUTH, "X-Request-Id": request_id.encode()}
    error = _openai_error(client.post("/v1/completions", json=body, headers=headers), 400)
    assert "X-Request-Id" in error["message"]


@pytest.mark.parametrize("path", list(BASE_BODIES))
def test_an_unsafe_request_id_is_400_naming_it(client, ready, path):
    resp = client.post(path, json={**BASE_BODIES[path], "request_id": "x" * 1000}, headers=AUTH)
    error = _openai_error(resp, 400)
    assert error["param"] == "body.request_id" and "128" in error["message"]


def test_vllm_xargs_json_errors_carry_no_documentation_url(app, client, ready, monkeypatch):
    from server.routes.openai import _options_from_xargs
    from server.schemas import ChatRequest
    body = ChatRequest(model="m", messages=[{"role": "user", "content": "a"}],
                       vllm_xargs={"flux": "{not json", "kv_policy": '{"name": 1}'})
    errors, _ = _options_from_xargs(body)
    assert errors and all("url" not in e for e in errors)
    # and none reaches an answer, whichever path raised it
    monkeypatch.setattr(app.state.engine, "client", SimpleNamespace(
        errored=False, model_config=SimpleNamespace(
            max_model_len=64, hf_text_config=SimpleNamespace(num_hidden_layers=2))))
    monkeypatch.setattr(app.state, "openai_serving_chat",
                        SimpleNamespace(create_chat_completion=None), raising=False)
    resp = client.post("/v1/chat/completions", headers=AUTH, json={
        **BASE_BODIES["/v1/chat/completions"], "vllm_xargs": {"flux": "{not json"}})
    error = _openai_error(resp, 400)
    assert error["param"] == "body.vllm_xargs.flux"
    assert "'url'" not in error["message"] and "errors.pydantic.dev" not in error["message"]


def test_stream_error_events_without_param_are_located():
    import asyncio
    import json

    from server.routes.openai import _count_disconnect
    from server.schemas import CompletionsRequest

    async def events():
        yield 'data: {"choices": []}\n\n'
        yield ('data: {"error": {"message": "Token id 5000 is out of vocabulary", '
               '"type": "BadRequestError", "param": null, "code": 400}}\n\n')
        yield "data: [DONE]\n\n"

    async def collect():
        return [e async for e in _count_disconnect(events(), "completions",
                                                   SimpleNamespace(alive=True),
                                                   CompletionsRequest)]
    out = asyncio.run(collect())
    assert out[0] == 'data: {"choices": []}\n\n' and out[2] == "data: [DONE]\n\n"
    assert json.loads(out[1][len("data: "):])["error"]["param"] == "prompt"
