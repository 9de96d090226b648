"""The running server against its own OpenAPI document, with schemathesis (bounded, ~2 min).

Requests generated from `/openapi.json`, valid ones (positive) and invalid ones (negative), for
every operation: no answer is a 5xx, every error is an OpenAI error body with the status as its
`code`, and a request the document calls invalid is rejected. The valid generation requests
carry the served model's name, the API key and a small `max_tokens`, so that they reach the
engine; the run must see some of them answered 200, or it proved nothing about the engine.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import negative_data_rejection

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
# examples per (operation, mode): enough to cover each field a few times, small enough that the
# whole run stays near two minutes on a 2-core machine with the smoke-test model
MAX_EXAMPLES = {"generation": 60, "other": 10}
MAX_TOKENS = 4
MAX_CHOICES = 2


@schemathesis.check
def openai_error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx/5xx body is {"error": {"message", "type", "param", "code"}}, code = status."""
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError as exc:
        raise AssertionError(f"error body is not JSON: {response.text[:200]!r}") from exc
    assert isinstance(body, dict) and set(body) == {"error"}, f"not an OpenAI error: {body}"
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), f"incomplete error: {error}"
    assert error["code"] == response.status_code, \
        f"code {error['code']} in a {response.status_code}"
    return True


CHECKS = [not_a_server_error, negative_data_rejection, openai_error_shape]


def _aim_at_the_engine(case: Any) -> None:
    """Valid generation bodies: the served model, few tokens and choices (all still valid)."""
    body = case.body
    if not isinstance(body, dict):
        return
    body["model"] = MODEL
    for field, cap in (("max_tokens", MAX_TOKENS), ("max_completion_tokens", MAX_TOKENS),
                       ("min_tokens", MAX_TOKENS), ("n", MAX_CHOICES)):
        value = body.get(field)  # integers may come as 5.0, which the schema allows
        if isinstance(value, int | float) and not isinstance(value, bool) and value > cap:
            body[field] = cap
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS


def _run(operation: Any, mode: GenerationMode, server: Any, statuses: Counter) -> None:
    generation = operation.path in GENERATION_PATHS
    examples = MAX_EXAMPLES["generation" if generation else "other"]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    def exercise(case: Any) -> None:
        if generation and mode is GenerationMode.POSITIVE:
            _aim_at_the_engine(case)
        response = case.call_and_validate(base_url=server.base_url, headers=server.auth,
                                          checks=CHECKS, timeout=120)
        statuses[(operation.label, mode.value, response.status_code)] += 1

    exercise()


def test_server_keeps_the_promises_of_its_openapi_document(server):
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json", timeout=30)
    statuses: Counter = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE]
        if len(operation.body) or len(operation.query):  # something that can be made invalid
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            _run(operation, mode, server, statuses)
    reached_engine = {label: n for (label, mode, status), n in statuses.items()
                      if status == 200 and mode == "positive"
                      and label.split(" ", 1)[1] in GENERATION_PATHS}
    summary = "\n".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
    print(summary)
    assert len(reached_engine) == len(GENERATION_PATHS), \
        f"valid generation requests never got a 200 on some endpoint:\n{summary}"
