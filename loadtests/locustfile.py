"""Locust load test for a running fluxserve: a mixed OpenAI chat workload.

    locust -f loadtests/locustfile.py --headless -u 8 -r 4 -t 60s --stop-timeout 30 \
        --host http://127.0.0.1:8000 --report-file build/locust/report.json

The mix (task weights in brackets):
- ``chat:short`` [3]: a short prompt, a plain (non-streamed) completion;
- ``chat:stream`` [2]: a short prompt, streamed, full attention;
- ``chat:long:flux`` [2]: a long prompt, streamed, Flux sparse attention (sink + window);
- ``chat:long:calidrop`` [2]: a long prompt, streamed, CaliDrop KV eviction to a small budget;
- ``/v1/reward``: not served yet; its task goes where ``RewardUser`` is marked below.

Streamed requests also report, as extra locust entries, the time to first token (``TTFT <name>``)
and the time per output token after the first (``TPOT <name>``), both in milliseconds. At the
end of the run the report file (JSON, and Markdown next to it) gives p50/p95 TTFT and TPOT,
requests/s and the failure count.

Environment: ``FLUXSERVE_API_KEY`` (when the server has one), ``FLUXSERVE_MODEL`` (default the
embedded smoke-test model), ``FLUXSERVE_LONG_PROMPT_WORDS`` ("MIN,MAX" words of a long prompt,
default "500,800": about 1,050-1,700 tokens of the smoke-test model's tokenizer, which fits a
2,048-token context with the 32 generated tokens). Point ``--host`` only at a server you own.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from locust import HttpUser, between, events, task
from locust.env import Environment

MODEL = os.environ.get("FLUXSERVE_MODEL", "fluxserve-tiny-smoke-test")
HEADERS = {"Authorization": f"Bearer {os.environ.get('FLUXSERVE_API_KEY', 'unused')}"}
WORDS = "the quick brown fox jumps over a lazy dog while reading long reports".split()
LONG_WORDS = tuple(int(n) for n in
                   os.environ.get("FLUXSERVE_LONG_PROMPT_WORDS", "500,800").split(","))
MAX_TOKENS = 32
# Every generation runs its full MAX_TOKENS (vLLM's `ignore_eos`): a model that samples its end
# token first would otherwise answer with no text, and TPOT would be measured over no tokens.
FIXED_LENGTH = {"ignore_eos": True}
TTFT = "TTFT"  # request_type of the extra entries; their response_time is in ms
TPOT = "TPOT"
REPORT_PERCENTILES = (0.5, 0.95)


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument("--report-file", type=str, default="",
                        help="Write the run's TTFT/TPOT/throughput summary here (JSON; a "
                             "Markdown table goes next to it).")


def _prompt(n_words: int) -> str:
    return " ".join(random.choice(WORDS) for _ in range(n_words))


class ChatUser(HttpUser):
    wait_time = between(0.1, 0.5)

    def _chat(self, name: str, n_words: int, extra: dict) -> None:
        body = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0.7, **FIXED_LENGTH,
                "messages": [{"role": "user", "content": _prompt(n_words)}], **extra}
        with self.client.post("/v1/chat/completions", json=body, headers=HEADERS, name=name,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            reply = resp.json()
            if not reply.get("choices") or reply["usage"]["completion_tokens"] < 1:
                resp.failure(f"no completion: {reply}")

    def _stream(self, name: str, n_words: int, extra: dict) -> None:
        """One streamed chat; checks the SSE stream ends properly and reports TTFT and TPOT."""
        body = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0.7, "stream": True,
                "stream_options": {"include_usage": True}, **FIXED_LENGTH,
                "messages": [{"role": "user", "content": _prompt(n_words)}], **extra}
        started = time.perf_counter()
        first = None
        finish_reason = None
        usage = None
        done = False
        with self.client.post("/v1/chat/completions", json=body, headers=HEADERS, name=name,
                              stream=True, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            for line in resp.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    resp.failure(f"error event: {chunk['error']}")
                    return
                for choice in chunk.get("choices", []):
                    if first is None and choice.get("delta", {}).get("content"):
                        first = time.perf_counter()
                    finish_reason = choice.get("finish_reason") or finish_reason
                usage = chunk.get("usage") or usage
            ended = time.perf_counter()
            if not done or finish_reason is None or not usage or first is None:
                resp.failure(f"stream ended early: done={done} finish_reason={finish_reason} "
                             f"usage={usage} first_token={first is not None}")
                return
        tokens = usage["completion_tokens"]
        self._metric(TTFT, name, (first - started) * 1000)
        if tokens > 1:
            self._metric(TPOT, name, (ended - first) * 1000 / (tokens - 1))

    def _metric(self, kind: str, name: str, ms: float) -> None:
        self.environment.events.request.fire(request_type=kind, name=f"{kind} {name}",
                                             response_time=ms, response_length=0,
                                             exception=None, context={})

    @task(3)
    def short_chat(self) -> None:
        self._chat("chat:short", random.randint(10, 60), {})

    @task(2)
    def short_stream(self) -> None:
        self._stream("chat:stream", random.randint(10, 60), {})

    @task(2)
    def long_flux(self) -> None:
        self._stream("chat:long:flux", random.randint(*LONG_WORDS),
                     {"flux": {"mode": "sparse", "sink": 16, "window": 128}})

    @task(2)
    def long_calidrop(self) -> None:
        self._stream("chat:long:calidrop", random.randint(*LONG_WORDS),
                     {"kv_policy": {"name": "calidrop", "budget": 128, "window": 16}})

    @task(1)
    def reward_scalar(self) -> None:
        """`/v1/reward` in scalar mode (the reward model scores two candidates)."""
        item = {"mode": "scalar", "candidates": ["The report says yes.", "It says no."],
                "messages": [{"role": "user", "content": _prompt(random.randint(10, 60))}]}
        with self.client.post("/v1/reward", json={"items": [item]}, headers=HEADERS,
                              name="reward:scalar", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            scores = [c.get("score") for c in resp.json()["data"][0]["candidates"]]
            if len(scores) != 2 or any(s is None for s in scores):
                resp.failure(f"no scores: {resp.text[:200]}")


def summarize(environment: Environment) -> dict:
    """The run's summary: HTTP entries (requests, failures, requests/s) and the TTFT/TPOT
    entries' p50/p95 in ms, per request name and over all streamed requests."""
    stats = environment.stats
    http = [e for e in stats.entries.values() if e.method not in (TTFT, TPOT)]
    duration = max(stats.total.last_request_timestamp - stats.total.start_time, 1e-9) \
        if stats.total.last_request_timestamp else 0.0
    summary: dict = {
        "duration_s": round(duration, 1),
        "requests": sum(e.num_requests for e in http),
        "failures": sum(e.num_failures for e in http),
        "requests_per_s": round(sum(e.num_requests for e in http) / duration, 3)
        if duration else 0.0,
        "endpoints": {e.name: {"requests": e.num_requests, "failures": e.num_failures,
                               "p50_ms": e.get_response_time_percentile(0.5),
                               "p95_ms": e.get_response_time_percentile(0.95)}
                      for e in sorted(http, key=lambda e: e.name)},
        "errors": [{"name": err.name, "error": str(err.error), "count": err.occurrences}
                   for err in stats.errors.values()],
    }
    for kind in (TTFT, TPOT):
        entries = sorted((e for e in stats.entries.values() if e.method == kind),
                         key=lambda e: e.name)
        per_name = {e.name.split(" ", 1)[1]: _percentiles(e) for e in entries}
        merged = None
        for entry in entries:
            if merged is None:
                merged = type(entry)(stats, "all", kind)
            merged.extend(entry)
        summary[kind.lower() + "_ms"] = {"all": _percentiles(merged) if merged else None,
                                         **per_name}
    return summary


def _percentiles(entry) -> dict:
    return {"count": entry.num_requests,
            **{f"p{int(q * 100)}": entry.get_response_time_percentile(q)
               for q in REPORT_PERCENTILES}}


def _markdown(summary: dict) -> str:
    lines = [f"# Locust run: {summary['requests']} requests in {summary['duration_s']} s, "
             f"{summary['requests_per_s']} requests/s, {summary['failures']} failed", "",
             "| request | count | p50 TTFT ms | p95 TTFT ms | p50 TPOT ms | p95 TPOT ms |",
             "|---|---|---|---|---|---|"]
    for name, ttft in summary["ttft_ms"].items():
        if ttft is None:
            continue
        tpot = summary["tpot_ms"].get(name) or {}
        lines.append(f"| {name} | {ttft['count']} | {ttft['p50']} | {ttft['p95']} | "
                     f"{tpot.get('p50', '')} | {tpot.get('p95', '')} |")
    lines += ["", "| endpoint | requests | failures | p50 ms | p95 ms |", "|---|---|---|---|---|"]
    for name, e in summary["endpoints"].items():
        lines.append(f"| {name} | {e['requests']} | {e['failures']} | {e['p50_ms']} | "
                     f"{e['p95_ms']} |")
    return "\n".join(lines) + "\n"


@events.quitting.add_listener
def _write_report(environment: Environment, **_kwargs) -> None:
    path = getattr(environment.parsed_options, "report_file", "") \
        if environment.parsed_options else ""
    if not path:
        return
    summary = summarize(environment)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(summary))
