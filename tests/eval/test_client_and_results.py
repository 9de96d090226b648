"""The HTTP client (retries, concurrency bound, discovery) against an in-process mock
transport, and the resumable results store."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from evaluation import client as client_mod
from evaluation.client import ApiError, AsyncClient, ClientConfig, SyncClient, discover
from evaluation.long_context import attention_work_saved
from evaluation.results import JsonlStore, format_table, write_csv


def _sync(handler) -> SyncClient:
    c = SyncClient(ClientConfig("http://test/v1", api_key="k", max_retries=2))
    c._http = httpx.Client(base_url="http://test", transport=httpx.MockTransport(handler),
                           headers=c.config.headers)
    return c


def test_retries_429_then_succeeds(monkeypatch):
    monkeypatch.setattr(client_mod.time, "sleep", lambda s: None)
    calls = []

    def handler(request):
        calls.append(request.headers["authorization"])
        if len(calls) < 3:
            return httpx.Response(429, headers={"Retry-After": "1"},
                                  json={"error": {"message": "busy"}})
        return httpx.Response(200, json={"ok": True})

    assert _sync(handler).request("GET", "/x") == {"ok": True}
    assert calls == ["Bearer k"] * 3


def test_client_error_is_not_retried():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(400, json={"error": {"message": "bad budget", "type": "x"}})

    with pytest.raises(ApiError) as info:
        _sync(handler).request("POST", "/v1/completions", json={})
    assert info.value.status == 400 and info.value.message == "bad budget" and len(calls) == 1


def test_discover_reads_models_and_extension_fields():
    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 4096}]})
        props = {"flux": {}, "kv_policy": {}, "continue_final_message": {}}
        return httpx.Response(200, json={"components": {"schemas": {
            "ChatRequest": {"properties": props},
            "CompletionsRequest": {"properties": {"flux": {}, "kv_policy": {}}}}}})

    info = discover(_sync(handler))
    assert (info.model, info.max_model_len, info.is_fluxserve, info.continue_final_message) == (
        "m", 4096, True, True)
    with pytest.raises(ValueError, match="not served"):
        discover(_sync(handler), "other")


def test_discover_plain_server_without_schema():
    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        return httpx.Response(404, json={"detail": "Not Found"})

    info = discover(_sync(handler))
    assert info.extension_fields == set() and info.max_model_len is None


def test_map_bounds_concurrency_and_keeps_order():
    in_flight, peak = 0, 0

    async def worker(i):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return i * i

    async def go():
        c = AsyncClient(ClientConfig(), concurrency=3)
        seen = []
        try:
            out = await c.map(worker, range(20), progress=False,
                              on_result=lambda i, r: seen.append(i))
        finally:
            await c.aclose()
        return out, seen

    out, seen = asyncio.run(go())
    assert out == [i * i for i in range(20)] and sorted(seen) == list(range(20)) and peak == 3


def test_jsonl_store_resumes_and_skips_a_torn_line(tmp_path):
    store = JsonlStore(tmp_path / "r.jsonl", key=lambda r: (r["k"],))
    store.append({"k": 1, "v": "error"})
    store.append({"k": 2, "v": "a"})
    store.append({"k": 1, "v": "retried"})
    with store.path.open("a") as f:
        f.write('{"k": 3, "v"')  # interrupted mid-write
    assert store.load() == {(1,): {"k": 1, "v": "retried"}, (2,): {"k": 2, "v": "a"}}


def test_csv_and_table(tmp_path):
    path = write_csv(tmp_path / "s.csv", [{"a": 1, "b": None}, {"a": 2, "c": "x"}])
    assert path.read_text().splitlines() == ["a,b,c", "1,,", "2,,x"]
    table = format_table(["task", "full"], [["vt", 12.5], ["cwe", None]])
    assert table.splitlines()[2].split() == ["vt", "12.5"] and "-" in table.splitlines()[3]


def test_attention_work_saved_from_usage():
    assert attention_work_saved({"prompt_tokens": 3}) is None
    assert attention_work_saved({"fluxserve": {"attention_work_saved": 0.25}}) == 0.25
    assert attention_work_saved({"fluxserve": {"attention_flops_saved": 10,
                                               "attention_flops_dense": 40}}) == 0.25
    assert attention_work_saved({"fluxserve": "n/a"}) is None
    json.dumps(attention_work_saved(None))
