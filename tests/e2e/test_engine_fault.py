"""Fault: the engine-core process dies under a running server (its own server, not the shared
one). The requests in flight fail with an error body (a stream with an error event), and the
server process exits non-zero within seconds, so that Docker or Kubernetes restarts it."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime

import httpx
import psutil
import pytest

from tests.e2e.conftest import MODEL, launch_server

pytestmark = pytest.mark.e2e

EXIT_WITHIN_S = 15
# Bounds on the test's own waits, far above what an idle machine needs: while the engine decodes
# on a 2-core machine, processes outside the server (this test) can stall for over a minute
STALL_S = 300
# Far more tokens than the tiny model decodes before the kill, even at vLLM's own CPU speed and
# when the API process delivers the first events late.
MAX_MODEL_LEN = 65536
MAX_TOKENS = 65000


def _engine_core(server_pid: int) -> psutil.Process:
    for child in psutil.Process(server_pid).children(recursive=True):
        if "EngineCore" in " ".join(child.cmdline()) or child.name().startswith("VLLM::Engine"):
            return child
    raise AssertionError("no engine-core process under the server")


def _seconds_from_death_to_exit(log: str) -> float:
    """From the watchdog's "engine dead" line to "exiting with status", by the log's stamps."""
    stamps = {}
    for line in log.splitlines():
        for key in ("fluxserve.lifecycle: engine dead", "fluxserve: exiting with status"):
            if key in line and key not in stamps:
                day, clock = line.split()[1:3]
                stamps[key] = datetime.strptime(f"{day} {clock}", "%Y-%m-%d %H:%M:%S,%f")
    assert len(stamps) == 2, f"watchdog lines missing from the log: {stamps}"
    return (stamps["fluxserve: exiting with status"]
            - stamps["fluxserve.lifecycle: engine dead"]).total_seconds()


def _long_request(server, stream: bool) -> dict:
    # ignore_eos: the request runs for its full max_tokens, so it is in flight at the kill. Long
    # enough that an idle machine cannot finish it before the kill, even when the API process
    # delivers the stream's first events late (it batches them)
    return {"model": MODEL, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": stream,
            "messages": [{"role": "user", "content": "go on"}]}


def test_engine_death_fails_requests_in_flight_and_ends_the_process(tmp_path):
    # no reward engine: the one engine core under the server is the chat model's
    with launch_server(["--reward-model", "none", "--max-model-len", str(MAX_MODEL_LEN)],
                       tmp_path) as server:
        url = f"{server.base_url}/v1/chat/completions"
        results: dict[str, object] = {}
        first_event = threading.Event()

        def streamed() -> None:
            events = []
            with httpx.stream("POST", url, headers=server.auth, timeout=STALL_S,
                              json=_long_request(server, True)) as resp:
                results["stream_status"] = resp.status_code
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        events.append(line.removeprefix("data: "))
                        first_event.set()
            results["stream_events"] = events

        def unstreamed() -> None:
            results["reply"] = httpx.post(url, headers=server.auth, timeout=STALL_S,
                                          json=_long_request(server, False))

        threads = [threading.Thread(target=streamed), threading.Thread(target=unstreamed)]
        for t in threads:
            t.start()
        assert first_event.wait(STALL_S), "the stream never started"
        time.sleep(0.5)  # the unstreamed request is in the engine too
        _engine_core(server.pid).kill()

        for t in threads:
            t.join(timeout=STALL_S)
        assert not any(t.is_alive() for t in threads), "a request in flight hung"

        # the stream: 200 already sent, so it ends with an error event and [DONE]
        assert results["stream_status"] == 200
        events = results["stream_events"]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503 and "killed by SIGKILL" in error["message"]
        # the unstreamed request: an OpenAI error body that names the cause
        reply = results["reply"]
        assert reply.status_code == 503
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "engine is dead" in error["message"] and "killed by SIGKILL" in error["message"]

        # the process exits non-zero within seconds (no zombie server answering 503); measured on
        # the server's own clock (its log), as this test's clock includes its own stalls
        exit_code = server.process.wait(timeout=STALL_S)
        assert exit_code not in (0, None)
        assert _seconds_from_death_to_exit(server.log_path.read_text()) < EXIT_WITHIN_S
        log = server.log_path.read_text()
        assert "engine dead (engine core process" in log and "killed by SIGKILL" in log
