"""Many concurrent requests of every kind, some dropped mid-stream: all answered, nothing leaked."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e

POLICIES = [
    {},
    {"flux": {"mode": "sparse", "sink": 8, "window": 64}},
    {"flux": {"mode": "layers", "sparse_layers": [1, 3], "window": 32}},
    {"kv_policy": {"name": "calidrop", "budget": 128, "window": 16}},
    {"kv_policy": {"name": "streaming", "budget": 96, "sink": 4}},
    {"flux": {"mode": "sparse", "sink": 8, "window": 64},
     "kv_policy": {"name": "snapkv", "budget": 128, "window": 16}},
]


async def _one(client: openai.AsyncOpenAI, i: int) -> str:
    rng = random.Random(i)
    extra = POLICIES[i % len(POLICIES)]
    prompt = " ".join(f"w{rng.randrange(500)}" for _ in range(rng.randrange(20, 400)))
    messages = [{"role": "user", "content": prompt}]
    if i % 5 == 4:  # dropped mid-stream
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=400, stream=True,
            extra_body={**extra, "min_tokens": 400})
        n = 0
        async for _ in stream:
            n += 1
            if n == 3:
                break
        await stream.close()
        return "dropped"
    if i % 2:
        r = await client.chat.completions.create(model=MODEL, messages=messages,
                                                 max_tokens=rng.randrange(1, 24),
                                                 extra_body=extra)
        assert r.choices[0].finish_reason in ("stop", "length")
        return "ok"
    text = ""
    async for chunk in await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=rng.randrange(1, 24), stream=True,
            extra_body=extra):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return "ok"


def test_concurrent_mixed_load_leaves_nothing_behind(server):
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key,
                                    max_retries=0, timeout=180)
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(_one(client, i) for i in range(40))), timeout=300)
        finally:
            await client.close()

    results = asyncio.run(run())
    assert results.count("ok") == 32 and results.count("dropped") == 8

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready = httpx.get(f"{server.base_url}/ready", timeout=10).json()
        if ready["unfinished_requests"] == 0 and \
                server.metric("vllm:num_requests_running") == 0 and \
                server.metric("vllm:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.5)
    assert httpx.get(f"{server.base_url}/ready", timeout=10).json()["unfinished_requests"] == 0
    assert server.metric("vllm:num_requests_running") == 0
    # every KV block came back (prefix-cached blocks are free for reuse, so not counted as used)
    assert server.metric("vllm:kv_cache_usage_perc") == 0
