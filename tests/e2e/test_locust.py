"""A bounded headless locust run (loadtests/locustfile.py) against the shared real server.

Asserts zero failed requests over the whole mix, writes the TTFT/TPOT/throughput report to
build/locust/ (JSON and Markdown), and checks the server is left clean: no unfinished request
on /ready and `vllm:kv_cache_usage_perc` back to its value before the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
REPORT = ROOT / "build" / "locust" / "report.json"
RUN_TIME_S = int(os.environ.get("FLUXSERVE_LOCUST_RUN_TIME_S", "60"))
USERS = 8
STOP_TIMEOUT_S = 30  # users finish their current request after the run time
KV_USAGE = "vllm:kv_cache_usage_perc"
EXPECTED_ENTRIES = {"chat:short", "chat:stream", "chat:long:flux", "chat:long:calidrop",
                    "reward:scalar"}
STREAMED = EXPECTED_ENTRIES - {"chat:short", "reward:scalar"}


def _settled(server: Server, timeout_s: float = 30) -> tuple[int, float]:
    """(unfinished requests, KV usage) once no request is left, or the last seen after timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        ready = httpx.get(f"{server.base_url}/ready", timeout=10)
        assert ready.status_code == 200, ready.text
        unfinished = ready.json()["unfinished_requests"]
        usage = server.metric(KV_USAGE)
        if unfinished == 0 or time.monotonic() > deadline:
            return unfinished, usage
        time.sleep(0.5)


def test_locust_mixed_load_has_no_failures_and_leaves_the_server_clean(server: Server,
                                                                       tmp_path: Path):
    unfinished, usage_before = _settled(server)
    assert unfinished == 0
    REPORT.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "-u", str(USERS), "-r", str(USERS), "-t", f"{RUN_TIME_S}s",
           "--stop-timeout", str(STOP_TIMEOUT_S), "--host", server.base_url,
           "--only-summary", "--loglevel", "WARNING", "--report-file", str(REPORT),
           "--csv", str(tmp_path / "locust")]
    env = dict(os.environ, FLUXSERVE_API_KEY=server.api_key)
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=RUN_TIME_S + STOP_TIMEOUT_S + 120)
    elapsed = time.monotonic() - started
    output = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert REPORT.exists(), f"no report (locust exit {proc.returncode}):\n{output}"
    summary = json.loads(REPORT.read_text())

    # Zero failures, every mix entry exercised, and locust agrees (exit 1 on any failure).
    assert summary["failures"] == 0 and not summary["errors"], json.dumps(summary, indent=2)
    assert proc.returncode == 0, output
    assert set(summary["endpoints"]) == EXPECTED_ENTRIES, summary["endpoints"]
    assert all(e["requests"] > 0 for e in summary["endpoints"].values()), summary["endpoints"]
    assert summary["requests"] >= USERS and summary["requests_per_s"] > 0
    # TTFT and TPOT were measured for every streamed entry and are ordered sensibly.
    for kind in ("ttft_ms", "tpot_ms"):
        assert set(summary[kind]) == STREAMED | {"all"}, summary[kind]
        for stat in summary[kind].values():
            assert stat["count"] > 0 and 0 < stat["p50"] <= stat["p95"], (kind, stat)
    assert REPORT.with_suffix(".md").read_text().startswith("# Locust run:")
    print(f"locust run: {elapsed:.1f} s wall; report {REPORT}\n"
          f"{REPORT.with_suffix('.md').read_text()}")

    # The server is left clean: nothing unfinished, KV usage back where it started.
    unfinished, usage_after = _settled(server)
    assert unfinished == 0
    assert usage_after == pytest.approx(usage_before, abs=1e-9), (usage_before, usage_after)
