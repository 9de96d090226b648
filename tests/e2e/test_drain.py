"""Graceful drain on SIGTERM, on the server's own process (started with no model and
`--served-model-name`, so it also checks that CLI combination against a real engine).

The streams started before SIGTERM finish with every token, a request after SIGTERM gets 503 with
Retry-After, a second SIGTERM cuts the drain short (a stream still running ends with an error
event and [DONE]), and the process exits 0 with its engine processes gone. The drain timeout's
own cut is the same code path with a deadline; tests/unit/test_admission.py times it.

Timing: while vLLM decodes a long request on a 2-core machine, every other process (this test
included) can be starved for tens of seconds. So nothing here waits on a race with the
generation: the drain timeout is far longer than any such stall, and the test ends the drain
itself with the second signal."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import httpx
import psutil
import pytest

from tests.e2e.conftest import launch_server

pytestmark = pytest.mark.e2e

NAME = "fluxserve-drain-test"
# Far longer than the checks below take, stalls included; the second signal ends the drain
DRAIN_TIMEOUT_S = 300
READY_503_WITHIN_S = 120
# Short streams finish with every token whether they end before or after SIGTERM (a stream in
# flight finishing during the drain is timed exactly in tests/unit/test_admission.py); kept short
# because concurrent long decodes are what stalls this test's process
SHORT_TOKENS = 48
STALL_S = 300
# Far more than the tiny model decodes while the checks run, at vLLM's own CPU speed
LONG_TOKENS = 65000
MAX_MODEL_LEN = 65536


def _stream(base_url: str, auth: dict, max_tokens: int, started: threading.Barrier,
            out: dict) -> None:
    body = {"model": NAME, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "count"}]}
    events: list[str] = []
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", headers=auth, json=body,
                      timeout=STALL_S) as resp:
        out["status"] = resp.status_code
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if len(events) == 1:
                    started.wait(timeout=STALL_S)
    out["events"] = events


def test_sigterm_drains_streams_refuses_new_requests_and_cuts_at_the_deadline(tmp_path):
    args = ["--served-model-name", NAME, "--drain-timeout", str(DRAIN_TIMEOUT_S),
            "--max-model-len", str(MAX_MODEL_LEN), "--reward-model", "none"]
    with launch_server(args, tmp_path) as server:
        models = httpx.get(f"{server.base_url}/v1/models", headers=server.auth, timeout=10)
        assert [m["id"] for m in models.json()["data"]] == [NAME]
        engine_procs = psutil.Process(server.pid).children(recursive=True)

        # The short streams first, then the long one: a request that arrives while one long
        # stream decodes at full CPU speed on 2 cores can wait for that stream to end
        short_started, long_started = threading.Barrier(9), threading.Barrier(2)
        outs = [{} for _ in range(9)]
        threads = [threading.Thread(target=_stream, args=(
            server.base_url, server.auth, LONG_TOKENS if i == 8 else SHORT_TOKENS,
            long_started if i == 8 else short_started, outs[i])) for i in range(9)]
        for t in threads[:8]:
            t.start()
        short_started.wait(timeout=STALL_S)  # every short stream has its first event
        threads[8].start()
        long_started.wait(timeout=STALL_S)
        os.kill(server.pid, signal.SIGTERM)

        deadline = time.monotonic() + READY_503_WITHIN_S
        while httpx.get(f"{server.base_url}/ready",
                        timeout=READY_503_WITHIN_S).status_code != 503:
            assert time.monotonic() < deadline, "/ready did not turn 503 after SIGTERM"
            time.sleep(0.05)
        assert httpx.get(f"{server.base_url}/ready", timeout=60).json() == {"status": "draining"}
        refused = httpx.post(f"{server.base_url}/v1/chat/completions", headers=server.auth,
                             timeout=60, json={"model": NAME, "max_tokens": 2,
                                               "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == 503
        assert httpx.get(f"{server.base_url}/health", timeout=60).status_code == 200

        for t in threads[:8]:
            t.join(timeout=DRAIN_TIMEOUT_S)
        assert not any(t.is_alive() for t in threads[:8])
        assert threads[8].is_alive() and server.process.poll() is None  # still draining
        os.kill(server.pid, signal.SIGTERM)  # the second signal cuts the drain short
        threads[8].join(timeout=STALL_S)
        assert not threads[8].is_alive()

        in_flight = re.search(r"draining: (\d+) generation requests in flight",
                              server.log_path.read_text())
        assert in_flight and int(in_flight.group(1)) >= 1  # the long stream at least
        for out in outs[:8]:  # every short stream finished with every token
            assert out["status"] == 200
            events = out["events"]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert not any("error" in c for c in chunks)
            assert [c["choices"][0]["finish_reason"] for c in chunks
                    if c["choices"] and c["choices"][0]["finish_reason"]] == ["length"]
            assert chunks[-1]["usage"]["completion_tokens"] == SHORT_TOKENS

        long_events = outs[8]["events"]  # cut by the second signal, visibly
        assert long_events[-1] == "[DONE]"
        error = json.loads(long_events[-2])["error"]
        assert error["code"] == 503 and "second shutdown signal" in error["message"]
        assert not any(json.loads(e)["choices"][0]["finish_reason"] for e in long_events[:-2]
                       if json.loads(e).get("choices"))

        assert server.process.wait(timeout=STALL_S) == 0
        _, alive = psutil.wait_procs(engine_procs, timeout=15)
        assert not alive, f"engine processes left running: {alive}"
