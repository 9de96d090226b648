"""OpenAI-compatible edges: prompt scoring, message rules, structured-output constraints checked
before admission, and an OpenAPI document that states what the server accepts."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e

PROMPT = "hello world, this is a scoring test"
USER = [{"role": "user", "content": "hi"}]


def _post(server, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json={"model": MODEL, **body},
                      headers=server.auth, timeout=120, **kwargs)


def _assert_400(resp: httpx.Response, param_part: str) -> dict:
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    error = resp.json()["error"]
    assert error["code"] == 400 and error["type"] and error["message"]
    assert param_part in (error["param"] or "") or param_part in error["message"], error
    return error


# --- max_tokens = 0: prompt scoring on /v1/completions with echo, and nothing else -------------

def test_prompt_scoring_returns_the_prompt_and_its_logprobs(server):
    r = server.client().completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1,
                                           max_tokens=0)
    choice = r.choices[0]
    assert choice.text == PROMPT  # the prompt and nothing generated
    assert r.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) >= 2
    assert lp.token_logprobs[0] is None  # the first token has no context to be scored in
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])


def test_prompt_scoring_of_token_ids_and_several_prompts(server):
    r = server.client().completions.create(model=MODEL, prompt=["one prompt", "and another"],
                                           echo=True, logprobs=0, max_tokens=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == \
        ["one prompt", "and another"]
    ids = [5, 6, 7, 8]
    r = server.client().completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1,
                                           max_tokens=0)
    assert len(r.choices[0].logprobs.token_logprobs) == len(ids)


def test_prompt_scoring_streamed(server):
    body = {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json={"model": MODEL, **body},
                      headers=server.auth, timeout=120) as resp:
        assert resp.status_code == 200
        events = [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["text"] for chunk in chunks for c in chunk["choices"]) == PROMPT
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 0 and usage["total_tokens"] == usage["prompt_tokens"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": False, "logprobs": 1},
     "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 0, "echo": True},
     "max_tokens"),
])
def test_max_tokens_zero_without_echo_is_400(server, path, body, param):
    _assert_400(_post(server, path, body), param)


# --- messages: the fields OpenAI requires for each role ------------------------------------

BAD_MESSAGES = {
    "user without content": [{"role": "user"}],
    "user content null": [{"role": "user", "content": None}],
    "system content null": [{"role": "system", "content": None}, *USER],
    "empty content parts": [{"role": "user", "content": []}],
    "text part without text": [{"role": "user", "content": [{"type": "text"}]}],
    "image part on a text server": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}],
    "unknown role": [{"role": "narrator", "content": "hi"}],
    "no role": [{"content": "hi"}],
    "assistant with neither content nor tool_calls": [*USER, {"role": "assistant"}],
    "assistant with empty tool_calls": [*USER, {"role": "assistant", "tool_calls": []}],
    "tool without tool_call_id": [*USER, {"role": "tool", "content": "42"}],
    "function without name": [*USER, {"role": "function", "content": "42"}],
}


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_messages_openai_rejects_are_400(server, case):
    _assert_400(_post(server, "/v1/chat/completions",
                      {"messages": BAD_MESSAGES[case], "max_tokens": 2}), "messages")


def test_message_without_content_with_the_openai_client(server):
    with pytest.raises(openai.BadRequestError) as err:
        server.client().chat.completions.create(model=MODEL, messages=[{"role": "user"}],
                                                max_tokens=2)
    assert err.value.status_code == 400


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                  {"type": "text", "text": " there"}]}],
    [{"role": "user", "content": ""}],
    [{"role": "system", "content": [{"type": "text", "text": "be brief"}]}, *USER,
     {"role": "assistant", "content": "ok", "refusal": None, "audio": None,
      "function_call": None}, {"role": "user", "content": "more"}],
])
def test_messages_openai_accepts_are_served(server, messages):
    r = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")


# --- structured outputs: checked before admission, streams included -------------------------

SELF_REF = {"$ref": "#/$defs/n", "$defs": {"n": {"$ref": "#/$defs/n"}}}
DEAD_PROPERTY = {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}},
                 "$defs": SELF_REF["$defs"]}
OK_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def _json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


BAD_CONSTRAINTS = {
    "json_schema that only refers to itself": ({"response_format": _json_schema_format(SELF_REF)},
                                               "response_format"),
    "optional property that admits no value": (
        {"response_format": _json_schema_format(DEAD_PROPERTY)}, "response_format"),
    "structured_outputs json, self-referring": ({"structured_outputs": {"json": SELF_REF}},
                                                "structured_outputs"),
    "regex that matches nothing": ({"structured_outputs": {"regex": "[^\\x00-\\U0010FFFF]"}},
                                   "structured_outputs"),
    "malformed regex": ({"structured_outputs": {"regex": "("}}, "structured_outputs"),
    "EBNF rule that never ends": ({"structured_outputs": {"grammar": "root ::= a\na ::= a"}},
                                  "structured_outputs"),
    "lark rule that never ends": ({"structured_outputs": {"grammar": 'start: a\na: a "x"'}},
                                  "structured_outputs"),
    "malformed grammar": ({"structured_outputs": {"grammar": "root ::= ("}},
                          "structured_outputs"),
    "empty choice": ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    "json_schema that is not JSON": ({"structured_outputs": {"json": "{not json"}},
                                     "structured_outputs"),
    "named tool whose parameters admit nothing": (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": SELF_REF}}],
         "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools"),
    "removed guided_json": ({"guided_json": OK_SCHEMA}, "guided_json"),
    "removed guided_regex": ({"guided_regex": "a+"}, "guided_regex"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", list(BAD_CONSTRAINTS))
def test_unservable_constraints_are_400_before_generation(server, case, stream):
    extra, param = BAD_CONSTRAINTS[case]
    body = {"messages": USER, "max_tokens": 4, "stream": stream, **extra}
    _assert_400(_post(server, "/v1/chat/completions", body), param)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_unservable_constraint_on_completions(server, stream):
    body = {"prompt": PROMPT, "max_tokens": 4, "stream": stream,
            "response_format": _json_schema_format(SELF_REF)}
    _assert_400(_post(server, "/v1/completions", body), "response_format")


def test_servable_constraints_still_generate(server):
    client = server.client()
    for extra in ({"response_format": _json_schema_format(OK_SCHEMA)},
                  {"structured_outputs": {"regex": "[a-z]{3}"}},
                  {"structured_outputs": {"choice": ["yes", "no"]}},
                  {"structured_outputs": {"grammar": 'root ::= "x" | a\na ::= a'}}):
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6,
                                           extra_body=extra)
        assert r.choices[0].message.content is not None, extra
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, extra_body={
        "structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].message.content in ("yes", "no")


def test_engine_serves_after_the_bad_constraints(server):
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    r = server.client().chat.completions.create(model=MODEL, messages=USER, max_tokens=3)
    assert r.choices[0].message.content is not None


# --- the OpenAPI document states what the server checks ------------------------------------

def test_openapi_document_agrees_with_validation(server):
    doc = httpx.get(f"{server.base_url}/openapi.json", timeout=30).json()
    schemas = doc["components"]["schemas"]
    chat, completions = schemas["ChatRequest"], schemas["CompletionsRequest"]
    assert chat["properties"]["messages"]["minItems"] == 1
    tools = chat["properties"]["tools"]["anyOf"]
    assert {"type": "null"} in tools and any(t.get("minItems") == 1 for t in tools)
    assert schemas["UserMessage"]["required"] == ["role", "content"]
    assert schemas["ToolMessage"]["required"] == ["role", "content", "tool_call_id"]
    assert "null" not in json.dumps(completions["properties"]["prompt"])
    temperature = chat["properties"]["temperature"]["anyOf"][0]
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)
    # what the document calls invalid is rejected ...
    _assert_400(_post(server, "/v1/chat/completions", {"messages": USER, "tools": []}), "tools")
    _assert_400(_post(server, "/v1/completions", {"prompt": None}), "prompt")
    _assert_400(_post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": "5"}),
                "max_tokens")
    # ... and an integer written as 5.0 is an integer, as in JSON Schema
    r = _post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 2.0})
    assert r.status_code == 200, r.text


# --- bodies vLLM's own checks used to trip on: located 400s, 415, counted, server unharmed -----

def test_malformed_bodies_are_located_and_counted_and_the_server_still_serves(server):
    def rejected(status: int) -> float:
        return server.metric("fluxserve:requests_rejected_total", endpoint="chat",
                             status=str(status))

    before = {400: rejected(400), 415: rejected(415)}
    # a 500 (AttributeError in vLLM's before-validator) that also reset the connection
    _assert_400(_post(server, "/v1/chat/completions",
                      {"messages": USER, "structured_outputs": "json"}), "structured_outputs")
    _assert_400(_post(server, "/v1/chat/completions", {"messages": None}), "body.messages")
    text = httpx.post(f"{server.base_url}/v1/chat/completions", content=json.dumps(
        {"model": MODEL, "messages": USER}), timeout=60,
        headers={**server.auth, "content-type": "text/plain"})
    assert text.status_code == 415 and text.json()["error"]["code"] == 415, text.text
    body = json.dumps({"model": MODEL, "messages": USER}).replace('"hi"', '"\\ud800"')
    surrogate = httpx.post(f"{server.base_url}/v1/chat/completions", content=body, timeout=60,
                           headers={**server.auth, "content-type": "application/json"})
    assert "messages.0.content" in _assert_400(surrogate, "surrogate")["message"]
    assert (rejected(400), rejected(415)) == (before[400] + 3, before[415] + 1)
    reply = server.client().chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert reply.choices[0].finish_reason == "length"


# --- the prompt and the completion share the context (the server runs --max-model-len 2048) ---

CONTEXT = 2048


def _ids(n: int) -> list[int]:
    return [5 + i % 400 for i in range(n)]


def _error(resp: httpx.Response, param: str) -> dict:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param, error
    return error


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_prompt_that_fills_the_context_names_the_prompt(server, stream):
    """Was vLLM's "max_tokens must be at least 1, got 0" (param max_tokens)."""
    for body in ({"max_tokens": 1}, {}):
        error = _error(_post(server, "/v1/completions", {
            "prompt": _ids(CONTEXT), "stream": stream, **body}), "prompt")
        assert f"context length is {CONTEXT} tokens" in error["message"]
        assert f"has {CONTEXT} tokens" in error["message"]
    _error(_post(server, "/v1/completions", {"prompt": _ids(CONTEXT + 1), "max_tokens": 1}),
           "prompt")


@pytest.mark.parametrize("extra", [{}, {"n": 2}, {"echo": True}, {"stream": True}],
                         ids=["plain", "n2", "echo", "stream"])
def test_max_tokens_past_the_context_left_is_400(server, extra):
    """Was a 200 with the completion silently cut to the context left."""
    error = _error(_post(server, "/v1/completions", {
        "prompt": _ids(CONTEXT - 1), "max_tokens": 2, **extra}), "max_tokens")
    msg = error["message"]
    assert f"context length is {CONTEXT} tokens" in msg and f"requested {CONTEXT + 1}" in msg
    assert f"{CONTEXT - 1} in the prompt, 2 in max_tokens" in msg


def test_what_fits_is_served_to_the_last_token(server):
    for body in ({"max_tokens": 1}, {}):  # without max_tokens: the context left
        r = _post(server, "/v1/completions", {"prompt": _ids(CONTEXT - 1), **body})
        assert r.status_code == 200, r.text
        assert r.json()["usage"] == {**r.json()["usage"], "prompt_tokens": CONTEXT - 1,
                                     "completion_tokens": 1}
    # prompt scoring: vLLM runs one decoding step (its engine refuses a prompt that fills the
    # context then), so the longest prompt scored is one token short of the context
    r = server.client().completions.create(model=MODEL, prompt=_ids(CONTEXT - 1), echo=True,
                                           logprobs=0, max_tokens=0)
    assert r.usage.prompt_tokens == CONTEXT - 1 and r.usage.completion_tokens == 0
    assert "scores the prompt" in _error(_post(server, "/v1/completions", {
        "prompt": _ids(CONTEXT), "echo": True, "max_tokens": 0}), "prompt")["message"]


def test_text_and_chat_prompts_follow_the_same_rule(server):
    text = "the quick brown fox jumps over the lazy dog " * 40
    tokens = httpx.post(f"{server.base_url}/tokenize", json={"model": MODEL, "prompt": text},
                        headers=server.auth, timeout=60).json()["count"]
    assert _post(server, "/v1/completions", {
        "prompt": text, "max_tokens": CONTEXT - tokens}).status_code == 200
    _error(_post(server, "/v1/completions", {"prompt": [text, "short"],
                                             "max_tokens": CONTEXT - tokens + 1}), "max_tokens")
    messages = [{"role": "user", "content": text}]
    chat_tokens = httpx.post(f"{server.base_url}/tokenize", headers=server.auth, timeout=60,
                             json={"model": MODEL, "messages": messages}).json()["count"]
    for field in ("max_tokens", "max_completion_tokens"):
        error = _error(_post(server, "/v1/chat/completions", {
            "messages": messages, field: CONTEXT - chat_tokens + 1}), field)
        assert f"{chat_tokens} in the messages" in error["message"]
    r = _post(server, "/v1/chat/completions", {"messages": messages,
                                               "max_tokens": CONTEXT - chat_tokens})
    assert r.status_code == 200, r.text


def test_truncation_to_fit_keeps_room_for_the_completion(server):
    r = _post(server, "/v1/completions", {"prompt": _ids(CONTEXT + 500), "max_tokens": 5,
                                          "truncate_prompt_tokens": -1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == CONTEXT - 5


# --- vLLM's 400s name the field -------------------------------------------------------------

@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "min_tokens": 5}, "min_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 3, "min_tokens": 5},
     "min_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "truncate_prompt_tokens": 0},
     "body.truncate_prompt_tokens"),
    ("/v1/chat/completions", {"messages": USER, "truncate_prompt_tokens": -5},
     "body.truncate_prompt_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "truncate_prompt_tokens": CONTEXT + 1},
     "truncate_prompt_tokens"),
    ("/v1/completions", {"prompt": [5, 10**9], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [[5, 6], [5, 10**9]], "max_tokens": 2, "stream": True},
     "prompt"),
    # the smoke-test model's template knows system, user and assistant only
    ("/v1/chat/completions", {"messages": [*USER, {"role": "tool", "content": "42",
                                                   "tool_call_id": "c1"}],
                              "max_tokens": 2}, "messages"),
    ("/v1/chat/completions", {"messages": USER, "request_id": "r" * 129}, "body.request_id"),
    ("/v1/completions", {"prompt": PROMPT, "request_id": "two words"}, "body.request_id"),
])
def test_request_errors_name_the_field(server, path, body, param):
    _error(_post(server, path, body), param)


def test_request_ids_are_bounded_in_the_header_too(server):
    r = httpx.post(f"{server.base_url}/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": PROMPT, "max_tokens": 1},
                   headers={**server.auth, "X-Request-Id": "x" * 300})
    assert r.status_code == 400 and "X-Request-Id" in r.json()["error"]["message"], r.text
    r = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1,
                                          "request_id": "trace-0123:abc"})
    assert r.status_code == 200 and "trace-0123:abc" in r.json()["id"], r.text


def test_a_negative_seed_is_a_seed(server):
    def text(seed: int) -> str:
        r = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                               temperature=1.0, seed=seed)
        return r.choices[0].text
    assert text(-7) == text(-7)


def test_vllm_xargs_errors_read_like_other_validation_errors(server):
    error = _error(_post(server, "/v1/chat/completions", {
        "messages": USER, "max_tokens": 2, "vllm_xargs": {"kv_policy": "{not json"}}),
        "body.vllm_xargs.kv_policy")
    assert "url" not in error["message"] and "json_invalid" in error["message"]
