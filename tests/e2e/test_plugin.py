"""The vLLM plugin runs in every engine process, the worker included, and its backend serves."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e


def _plugin_processes(server) -> set[str]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return {m.group(1) for m in re.finditer(
        r'^fluxserve:plugin_loads_total\{process="([^"]+)"\} ([0-9.]+)$', text, re.M)
        if float(m.group(2)) >= 1}


def test_plugin_registered_in_engine_core_and_worker(server):
    processes = _plugin_processes(server)
    assert any("Worker" in p for p in processes), processes
    assert any("EngineCore" in p for p in processes), processes


def test_plugin_backend_runs_the_worker_side_of_a_request(server):
    before = server.metric('fluxserve:flux_requests_total{mode="sparse"}')
    server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello " * 40}], max_tokens=3,
        extra_body={"flux": {"mode": "sparse", "sink": 4, "window": 16}})
    # recorded by the attention backend in the worker process once the prompt is prefilled
    assert server.metric('fluxserve:flux_requests_total{mode="sparse"}') == before + 1
