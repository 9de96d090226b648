"""Fault: the engine-core process dies under a running server. Liveness turns 503 (so an
orchestrator restarts the pod), readiness too, and requests fail fast with an error body
instead of hanging."""

from __future__ import annotations

import time

import httpx
import psutil
import pytest

from tests.e2e.conftest import MODEL, launch_server

pytestmark = pytest.mark.e2e


def _engine_core(server_pid: int) -> psutil.Process:
    for child in psutil.Process(server_pid).children(recursive=True):
        if "EngineCore" in " ".join(child.cmdline()) or child.name().startswith("VLLM::Engine"):
            return child
    raise AssertionError("no engine-core process under the server")


def test_dead_engine_is_reported_and_requests_fail_fast(tmp_path):
    # no reward engine: the one engine core under the server is the chat model's
    with launch_server(["--reward-model", "none"], tmp_path) as server:
        ok = server.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert ok.choices[0].message.content is not None
        _engine_core(server.pid).kill()

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if httpx.get(f"{server.base_url}/health", timeout=5).status_code == 503:
                break
            time.sleep(0.5)
        assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 503
        assert httpx.get(f"{server.base_url}/ready", timeout=5).status_code == 503

        started = time.monotonic()
        resp = httpx.post(f"{server.base_url}/v1/chat/completions", headers=server.auth,
                          json={"model": MODEL, "max_tokens": 4,
                                "messages": [{"role": "user", "content": "still there?"}]},
                          timeout=60)
        assert time.monotonic() - started < 30
        assert resp.status_code >= 500
        assert set(resp.json()["error"]) >= {"message", "type", "code"}
