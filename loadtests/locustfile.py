"""Locust load test for a running fluxserve (loopback only by default).

    .venv/bin/pip install locust
    .venv/bin/locust -f loadtests/locustfile.py --headless -u 8 -r 2 -t 60s \
        --host http://127.0.0.1:8000

Bounded by locust's -t; set FLUXSERVE_API_KEY if the server has one.
"""

from __future__ import annotations

import os
import random

from locust import HttpUser, between, task

MODEL = os.environ.get("FLUXSERVE_MODEL", "fluxserve-tiny-smoke-test")
HEADERS = {"Authorization": f"Bearer {os.environ.get('FLUXSERVE_API_KEY', 'unused')}"}
WORDS = "the quick brown fox jumps over a lazy dog while reading long reports".split()


def _prompt(n_words: int) -> str:
    return " ".join(random.choice(WORDS) for _ in range(n_words))


class ChatUser(HttpUser):
    wait_time = between(0.1, 0.5)

    def _chat(self, name: str, extra: dict) -> None:
        body = {"model": MODEL, "max_tokens": 32, "temperature": 0.7,
                "messages": [{"role": "user", "content": _prompt(random.randint(50, 400))}],
                **extra}
        self.client.post("/v1/chat/completions", json=body, headers=HEADERS, name=name)

    @task(4)
    def dense(self) -> None:
        self._chat("chat:full", {})

    @task(2)
    def sparse(self) -> None:
        self._chat("chat:sparse", {"flux": {"mode": "sparse", "sink": 16, "window": 128}})

    @task(2)
    def evicted(self) -> None:
        self._chat("chat:calidrop", {"kv_policy": {"name": "calidrop", "budget": 128}})
