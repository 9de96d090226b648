"""Property: no request body over the fluxserve options and the sampling fields harms the server.

Hypothesis generates bodies for both endpoints mixing valid, edge and out-of-range values of
`flux`, `kv_policy` (top level and through `vllm_xargs`), the OpenAI sampling fields and the
vLLM per-request inputs that reach the worker (logit bias, allowed/bad tokens, prompt logprobs,
structured-output grammars), on
short and long prompts (a long one with n > 1 is prefilled in several chunks). Every body must
get 200 or a 4xx in the OpenAI error shape; afterwards the engine is alive and has no
unfinished request. Bounded: 60 examples, at most 6 tokens each.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kv_policies.eviction.options import POLICY_NAMES
from tests.e2e.conftest import MODEL
from tests.e2e.test_engine_safety import assert_engine_settles, assert_openai_error

pytestmark = pytest.mark.e2e

PROMPTS = [
    "Hello",
    " ".join(f"item{i}" for i in range(150)),  # ~500 tokens
    " ".join(f"term{i}" for i in range(430)),  # ~1,600 tokens: chunked when n > 1
]

# Values around every bound, plus the ones from the bug reports.
HUGE = st.sampled_from([2**29 + 1, 2**31, 2**62 + 1, 2**63, 2**64, 4611686018427387905])
TOKENS = st.one_of(st.integers(-2, 2100), HUGE)
SMALL_TOKENS = st.one_of(st.integers(-1, 80), HUGE)


flux_options = st.fixed_dictionaries(
    {"mode": st.sampled_from(["full", "sparse", "layers", "auto", "half"])},
    optional={
        "sparse_layers": st.lists(st.one_of(st.integers(-1, 5), HUGE), max_size=6),
        "sink": TOKENS,
        "window": TOKENS,
    },
)

kv_policy_options = st.fixed_dictionaries(
    {"name": st.sampled_from([*POLICY_NAMES, "bogus"])},
    optional={
        "budget": TOKENS,
        "window": SMALL_TOKENS,
        "pool_kernel": st.one_of(st.integers(-1, 70), HUGE),
        "sink": SMALL_TOKENS,
        "tau": st.floats(-1.5, 1.5, allow_nan=False),
    },
)

sampling_fields = st.fixed_dictionaries({}, optional={
    "seed": st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([2**63, -(2**63) - 1])),
    "n": st.integers(0, 3),
    "temperature": st.floats(0, 2.5, allow_nan=False),
    "top_p": st.floats(0, 1.2, allow_nan=False),
    "top_k": st.integers(-2, 3000),
    "max_tokens": st.integers(-1, 6),
    "stop": st.lists(st.text(min_size=0, max_size=4), max_size=3),
    "presence_penalty": st.floats(-2.5, 2.5, allow_nan=False),
    "logit_bias": st.dictionaries(st.integers(-1, 2100).map(str),
                                  st.floats(-100, 100, allow_nan=False), max_size=3),
    "frequency_penalty": st.floats(-2.5, 2.5, allow_nan=False),
    "repetition_penalty": st.floats(0, 3, allow_nan=False),
    "min_tokens": st.integers(-1, 8),
    "allowed_token_ids": st.lists(st.integers(-1, 2100), max_size=3),
    "bad_words": st.lists(st.sampled_from(["", "the", " item1", "\x00"]), max_size=2),
    "structured_outputs": st.sampled_from([
        {"regex": "[ab]{2,4}"}, {"regex": "(a|"}, {"choice": ["yes", "no"]}, {"choice": []},
        {"json": {"type": "object"}}, {"json": {"type": "bogus"}},
        {"grammar": 'root ::= "x" | "y"'},
    ]),
    "stream": st.booleans(),
})


@st.composite
def bodies(draw) -> tuple[str, dict]:
    endpoint = draw(st.sampled_from(["completions", "chat"]))
    prompt = draw(st.sampled_from(PROMPTS))
    body: dict = {"model": MODEL, "max_tokens": 4, **draw(sampling_fields)}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        if draw(st.booleans()):
            body["logprobs"] = True
            body["top_logprobs"] = draw(st.integers(-1, 22))
    else:
        body["prompt"] = prompt
        if draw(st.booleans()):
            body["logprobs"] = draw(st.integers(-1, 22))
        if draw(st.booleans()):
            body["prompt_logprobs"] = draw(st.integers(-1, 22))
    for key, strategy in (("flux", flux_options), ("kv_policy", kv_policy_options)):
        where = draw(st.sampled_from(["absent", "absent", "top", "xargs"]))
        if where == "top":
            body[key] = draw(strategy)
        elif where == "xargs":  # vllm_xargs carries no objects: a JSON string
            body.setdefault("vllm_xargs", {})[key] = json.dumps(draw(strategy))
    if body.get("max_tokens", 1) > 0 and body.get("n", 1) > 1:
        body["max_tokens"] = min(body["max_tokens"], 3)
    return endpoint, body


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=bodies())
def test_any_body_gets_200_or_openai_4xx_and_the_engine_recovers(server, case):
    endpoint, body = case
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    resp = httpx.post(f"{server.base_url}{path}", json=body, headers=server.auth, timeout=180)
    event(f"HTTP {resp.status_code}")  # --hypothesis-show-statistics: how many were served
    if resp.status_code == 200:
        if body.get("stream"):
            assert "data: [DONE]" in resp.text, resp.text[-500:]
            assert '"error"' not in resp.text, resp.text[-500:]
        else:
            assert resp.json()["choices"], resp.text
    else:
        assert 400 <= resp.status_code < 500, (body, resp.status_code, resp.text)
        assert_openai_error(resp, resp.status_code)
    assert_engine_settles(server)
