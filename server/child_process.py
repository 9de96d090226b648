"""Run an HTTP server (fluxserve, or stock vLLM for comparison) as a child process on a free
loopback port: for the end-to-end tests and the serving benchmarks.

The child gets its own session, so stopping it takes its whole process group down: the API
server, the engine core and the workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


class ServerStartError(RuntimeError):
    """The child exited, or did not answer its readiness URL in time (the log's tail says why)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log_path: Path) -> str:
    return log_path.read_text()[-4000:]


@contextlib.contextmanager
def child_server(cmd: list[str], *, env: dict[str, str], log_path: Path, ready_path: str,
                 timeout_s: float) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start ``cmd --port PORT``, wait until ``GET ready_path`` answers 200, yield
    ``(base_url, process)``; stop the process group afterwards (SIGTERM, then SIGKILL)."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise ServerStartError(f"server exited with {proc.returncode}:\n"
                                       f"{_tail(log_path)}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base_url}{ready_path}", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ServerStartError(f"server not ready in {timeout_s}s:\n{_tail(log_path)}")
            time.sleep(1)
        yield base_url, proc
    finally:
        # The group may be gone already (a test that ended the server itself).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
