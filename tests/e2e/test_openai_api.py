"""The OpenAI API through the official `openai` client, against the real server."""

from __future__ import annotations

import httpx
import pytest

from kv_policies.eviction.options import OPTIONS_BY_NAME
from server.reward.default_model import DEFAULT_REWARD_MODEL_NAME
from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three prime numbers."}]


def test_models_lists_the_smoke_test_model(server):
    models = server.client().models.list().data
    # the embedded reward model (/v1/reward scalar mode) is listed after the chat model
    assert [m.id for m in models] == [MODEL, DEFAULT_REWARD_MODEL_NAME]
    assert "smoke-test" in models[0].owned_by


def test_chat_completion_non_stream(server):
    r = server.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_greedy_is_deterministic_and_seeded_sampling_repeats(server):
    c = server.client()
    greedy = [c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10,
                                        temperature=0).choices[0].message.content
              for _ in range(2)]
    assert greedy[0] == greedy[1]
    seeded = [c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10,
                                        temperature=1.0, top_p=0.9, seed=1234
                                        ).choices[0].message.content
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_n_choices_and_max_completion_tokens(server):
    r = server.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, n=3, max_completion_tokens=5, temperature=1.0, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens <= 15
    assert all(c.finish_reason == "length" for c in r.choices)


def test_logprobs(server):
    r = server.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
        top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for tok in content:
        assert tok.logprob <= 0.0
        assert len(tok.top_logprobs) == 3
        # greedy: the sampled token is the most likely one
        assert tok.logprob == pytest.approx(max(t.logprob for t in tok.top_logprobs), abs=1e-4)


def test_stop_sequence_is_honoured(server):
    c = server.client()
    free = c.completions.create(model=MODEL, prompt="The list: a, b, c", max_tokens=24,
                                temperature=0).choices[0].text
    assert len(free) > 4
    stop = free[2:5]
    r = c.completions.create(model=MODEL, prompt="The list: a, b, c", max_tokens=24,
                             temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text
    assert free.startswith(r.choices[0].text)


def test_chat_stream_matches_non_stream_and_reports_usage(server):
    c = server.client()
    full = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16,
                                     temperature=0)
    stream = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_completions_non_stream_and_stream(server):
    c = server.client()
    r = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens <= 8
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True)
        if ch.choices)
    assert text == r.choices[0].text


def test_extension_fields_are_accepted(server):
    r = server.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
        extra_body={"flux": {"mode": "sparse", "sink": 4, "window": 16},
                    "kv_policy": {"name": "snapkv", "budget": 64, "window": 8}})
    assert r.choices[0].message.content is not None


def test_openapi_docs_describe_the_extension_fields(server):
    spec = httpx.get(f"{server.base_url}/openapi.json", timeout=10).json()
    assert "/v1/chat/completions" in spec["paths"]
    schemas = spec["components"]["schemas"]
    # `kv_policy` is the union of the policies' options models, one schema each
    assert "FluxOptions" in schemas
    assert {cls.__name__ for cls in OPTIONS_BY_NAME.values()} <= set(schemas)
    assert httpx.get(f"{server.base_url}/docs", timeout=10).status_code == 200
