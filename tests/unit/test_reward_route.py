"""/v1/reward paths that need no engine: scalar mode on a server without a reward model, /ready
while the reward engine starts, and the endpoint's OpenAPI documentation."""

from __future__ import annotations

import argparse

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.config import ServerSettings
from server.engine import EngineState
from server.errors import install_error_handlers
from server.lifecycle import Lifecycle
from server.reward.engine import RewardEngineState
from server.routes import ops, reward


def _app(reward_engine: RewardEngineState | None) -> FastAPI:
    app = FastAPI()
    app.state.args = argparse.Namespace(model="chat", served_model_name=["chat"],
                                        log_error_stack=False)
    app.state.settings = ServerSettings()
    app.state.engine = EngineState(ready=True)
    app.state.reward_engine = reward_engine
    app.state.lifecycle = Lifecycle()
    install_error_handlers(app)
    app.include_router(ops.router)
    app.include_router(reward.router)
    return app


ITEM = {"messages": [{"role": "user", "content": "q"}], "candidates": ["a", "b"],
        "mode": "scalar"}


def test_scalar_without_reward_model_is_400() -> None:
    resp = TestClient(_app(None)).post("/v1/reward", json={"items": [ITEM]})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == 400 and "--reward-model" in error["message"]


def test_scalar_while_reward_engine_starts_is_503_and_not_ready() -> None:
    client = TestClient(_app(RewardEngineState(model_path="/m", model_name="rm")))
    resp = client.post("/v1/reward", json={"items": [ITEM]})
    assert resp.status_code == 503 and "reward engine" in resp.json()["error"]["message"]
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json() == {"status": "starting"}


def test_dead_reward_engine_fails_health() -> None:
    state = RewardEngineState(model_path="/m", model_name="rm", error="RuntimeError: boom")
    resp = TestClient(_app(state)).get("/health")
    assert resp.status_code == 503 and "reward engine" in resp.json()["error"]


@pytest.mark.parametrize("name", ["RewardRequest", "RewardResponse", "RewardItemResult",
                                  "Judgment", "PromptTruncation"])
def test_openapi_documents_the_models(name: str) -> None:
    schema = _app(None).openapi()
    assert "/v1/reward" in schema["paths"]
    assert name in schema["components"]["schemas"]
