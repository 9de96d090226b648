"""One real fluxserve server process (embedded smoke-test model, CPU vLLM) shared by the session.

It listens on a free loopback port and requires an API key, so the auth tests use it too.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from server.child_process import ServerStartError, child_server

API_KEY = "test-key-e2e"
MODEL = "fluxserve-tiny-smoke-test"
START_TIMEOUT_S = 420


@dataclass
class Server:
    base_url: str
    api_key: str
    log_path: Path
    pid: int = 0
    process: subprocess.Popen | None = None

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key, max_retries=0,
                             timeout=120)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of one Prometheus metric over the label sets that carry `labels`."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        wanted = [f'{key}="{value}"' for key, value in labels.items()]
        total = 0.0
        for line in text.splitlines():
            if not (line.startswith(name + "{") or line.startswith(name + " ")):
                continue
            label_part = line[len(name):].rsplit(" ", 1)[0]
            if all(w in label_part for w in wanted):
                total += float(line.rsplit(" ", 1)[1])
        return total


@contextlib.contextmanager
def launch_server(extra_args: list[str], log_dir: Path, api_key: str = API_KEY
                  ) -> Iterator[Server]:
    """Start `fluxserve serve` on a free loopback port, wait for /ready, stop it afterwards."""
    log_path = log_dir / "server.log"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1",
           "--api-key", api_key, "--max-model-len", "2048", "--enforce-eager",
           "--max-num-seqs", "16",
           # the embedded reward model's engine (/v1/reward scalar mode): a small KV cache
           "--reward-max-model-len", "2048", "--reward-kv-cache-memory-bytes", str(64 << 20),
           *extra_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with contextlib.ExitStack() as stack:
        try:
            base_url, proc = stack.enter_context(child_server(
                cmd, env=env, log_path=log_path, ready_path="/ready",
                timeout_s=START_TIMEOUT_S))
        except ServerStartError as exc:
            pytest.fail(str(exc))
        yield Server(base_url, api_key, log_path, proc.pid, proc)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with launch_server([], tmp_path_factory.mktemp("server")) as srv:
        yield srv
