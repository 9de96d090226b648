"""`fluxserve bench`: its statistics, table and files, the streamed-request timing, and whole
runs against small stand-in servers on loopback (plain HTTP, SSE streams whose delays depend on
the policy, so the measured speedups are known in direction)."""

from __future__ import annotations

import asyncio
import csv
import json
import threading
import time
from collections import Counter
from contextlib import ExitStack

import httpx
import pytest

from evaluation import bench
from evaluation import client as client_mod
from evaluation.bench import BenchConfig, BenchError, Job, percentile, render_table, summarize
from evaluation.client import ApiError, AsyncClient, ClientConfig
from evaluation.policies import parse_policies
from evaluation.tokenization import HFTokenizer
from tests.eval.conftest import TOKENIZER_JSON
from tests.eval.stand_in import JsonHandler, serve

# ---------------------------------------------------------------------------------------------
# statistics, table, files (synthetic records)


def _record(length, policy, ttft, tpot, *, warmup=False, error=None, out=4):
    return {"length": length, "policy": policy, "round": 0, "index": 0, "warmup": warmup,
            "error": error, "ttft_s": ttft, "tpot_s": tpot, "latency_s": ttft + 3 * tpot,
            "output_tokens": out, "prompt_tokens": length, "attention_work_saved": None}


def test_percentile_interpolates_like_numpy():
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 95) == pytest.approx(3.85)
    assert percentile([1.0, 2.0], 0) == 1.0 and percentile([1.0, 2.0], 100) == 2.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_gives_one_row_per_cell_with_speedups_over_the_baseline():
    policies = bench._resolve_policies(["calidrop:512", "sparse"])
    assert [p.name for p in policies] == ["full", "calidrop:512", "sparse"]
    records = [
        _record(256, "full", 0.100, 0.020), _record(256, "full", 0.300, 0.040),
        _record(256, "sparse", 0.050, 0.010), _record(256, "sparse", 0.150, 0.020),
        _record(256, "full", 9.0, 9.0, warmup=True),  # warm-up: left out
        _record(512, "full", 0.400, 0.030), _record(512, "calidrop:512", 0.400, 0.015),
        _record(512, "calidrop:512", 0.0, 0.0, error="HTTP 500 from /v1/completions: boom"),
    ]
    rows = summarize(records, policies)
    assert [(r["length"], r["policy"]) for r in rows] == [
        (256, "full"), (256, "sparse"), (512, "full"), (512, "calidrop:512")]
    full256, sparse256, full512, cali512 = rows
    assert full256["requests"] == 2 and full256["errors"] == 0
    assert full256["ttft_ms_p50"] == 200.0 and full256["ttft_ms_mean"] == 200.0
    assert full256["ttft_ms_p95"] == pytest.approx(290.0)
    assert full256["tpot_ms_p50"] == 30.0 and sparse256["tpot_ms_p50"] == 15.0
    assert (full256["ttft_speedup"], full256["tpot_speedup"]) == (1.0, 1.0)
    assert (sparse256["ttft_speedup"], sparse256["tpot_speedup"]) == (2.0, 2.0)
    assert sparse256["flux_mode"] == "sparse" and cali512["kv_policy"] == "calidrop"
    assert cali512["kv_budget"] == 512
    assert (cali512["requests"], cali512["errors"]) == (1, 1)  # the failure is counted apart
    assert (cali512["ttft_speedup"], cali512["tpot_speedup"]) == (1.0, 2.0)
    assert full512["prompt_tokens"] == 512.0 and full512["output_tokens"] == 4.0

    table = render_table(rows).splitlines()
    assert table[0].split()[:4] == ["length", "policy", "ok", "errors"]
    assert table[3].split() == ["256", "sparse", "2", "0", "100.0", "145.0", "15.0", "19.5",
                                "2.00x", "2.00x"]
    assert len(table) == 2 + 4 + 1


def test_a_cell_without_a_successful_request_has_no_times_and_no_speedup():
    rows = summarize([_record(256, "full", 0.1, 0.01),
                      _record(256, "sparse", 0, 0, error="HTTP 400: no")],
                     parse_policies(["full", "sparse"]))
    sparse = rows[1]
    assert sparse["requests"] == 0 and sparse["errors"] == 1
    assert sparse["ttft_ms_p50"] is None and sparse["ttft_speedup"] is None
    assert "-" in render_table(rows).splitlines()[3]


def test_plots_write_pngs_and_skip_speedup_without_another_policy(tmp_path):
    policies = parse_policies(["full", "sparse"])
    rows = summarize([_record(n, p, 0.1 * n / 256, 0.01) for n in (256, 1024)
                      for p in ("full", "sparse")], policies)
    notes: list[str] = []
    paths = bench.plots(tmp_path, rows, ["full", "sparse"], notes)
    assert [p.name for p in paths] == ["ttft_vs_length.png", "tpot_vs_length.png",
                                       "speedup.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths) and not notes
    only = bench.plots(tmp_path / "b", [r for r in rows if r["policy"] == "full"], ["full"],
                       notes)
    assert [p.name for p in only] == ["ttft_vs_length.png", "tpot_vs_length.png"]
    assert "speedup.png not written" in notes[0]


def test_schedule_interleaves_the_policies_round_by_round():
    batches = bench.schedule([256, 512], ["full", "sparse", "snapkv:64"], repeats=2, warmup=1,
                             concurrency=2)
    assert len(batches) == 2 * 3 * 3 and all(len(b) == 2 for b in batches)
    order = [(b[0].length, b[0].policy, b[0].round, b[0].warmup) for b in batches[:9]]
    assert order == [(256, "full", 0, True), (256, "sparse", 0, True),
                     (256, "snapkv:64", 0, True),
                     (256, "sparse", 1, False), (256, "snapkv:64", 1, False),
                     (256, "full", 1, False),
                     (256, "snapkv:64", 2, False), (256, "full", 2, False),
                     (256, "sparse", 2, False)]
    assert [j.index for j in batches[0]] == [0, 1]


class _Encoder:
    def encode(self, text):
        return [len(w) for w in text.split()]


def test_prompts_have_the_exact_length_and_differ_per_request():
    source = bench.PromptSource(_Encoder(), seed=3)
    jobs = [Job(256, p, r, i) for p in ("full", "sparse") for r in range(2) for i in range(3)]
    prompts = [source.prompt(job) for job in jobs]
    assert all(len(p) == 256 for p in prompts)
    assert len({tuple(p[:16]) for p in prompts}) == len(prompts)  # no shared first block
    assert source.prompt(jobs[0]) == prompts[0]  # reproducible from the seed
    text = bench.PromptSource(object(), seed=3)  # no encoder: approximate text prompts
    assert not text.exact and isinstance(text.prompt(jobs[0]), str)
    assert 256 * 4 <= len(text.prompt(jobs[0])) < 256 * 4 + 40


def test_prompts_from_a_local_tokenizer_are_its_token_ids(tokenizer):
    source = bench.PromptSource(HFTokenizer(TOKENIZER_JSON, chat=False, prefill=False), seed=0)
    prompt = source.prompt(Job(300, "full", 0, 0))
    assert len(prompt) == 300 and all(0 <= t < tokenizer.get_vocab_size() for t in prompt)
    assert tokenizer.token_to_id("<|begin_of_text|>") not in source.pool  # no BOS in the pool


# ---------------------------------------------------------------------------------------------
# the streamed request (mock transport)


def _sse(*events) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n"
                   for e in events).encode()


def _async(handler, retries=2) -> AsyncClient:
    c = AsyncClient(ClientConfig("http://test", max_retries=retries))
    c._http = httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(handler))
    return c


def _chunk(text="a", finish=None):
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def test_measure_reads_tokens_and_usage_and_retries_before_the_stream(monkeypatch):
    async def no_sleep(_s):
        return None

    monkeypatch.setattr(client_mod.asyncio, "sleep", no_sleep)
    calls = []

    def handler(request):
        calls.append(json.loads(request.content))
        if len(calls) == 1:
            return httpx.Response(503, headers={"Retry-After": "0"},
                                  json={"error": {"message": "starting"}})
        return httpx.Response(200, content=_sse(
            _chunk(), _chunk(""), _chunk("b", "length"),
            {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3,
                                      "fluxserve": {"attention_work_saved": 0.5}}}, "[DONE]"),
            headers={"content-type": "text/event-stream"})

    result = asyncio.run(bench.measure(_async(handler), {"prompt": [1, 2], "stream": True}))
    assert len(calls) == 2 and calls[1] == {"prompt": [1, 2], "stream": True}
    assert result["output_tokens"] == 3 and result["prompt_tokens"] == 9
    assert 0 <= result["ttft_s"] <= result["latency_s"] and result["tpot_s"] >= 0
    assert result["attention_work_saved"] == 0.5


def test_an_error_event_or_an_empty_stream_fails_the_request():
    def error_event(request):
        return httpx.Response(200, content=_sse(_chunk(), {"error": {
            "message": "engine died", "type": "InternalServerError"}}, "[DONE]"))

    with pytest.raises(ApiError, match="engine died"):
        asyncio.run(bench.measure(_async(error_event), {}))

    def empty(request):
        return httpx.Response(200, content=_sse("[DONE]"))

    with pytest.raises(ApiError, match="without a token"):
        asyncio.run(bench.measure(_async(empty), {}))

    def refused(request):
        return httpx.Response(400, json={"error": {"message": "bad kv budget"}})

    with pytest.raises(ApiError) as info:
        asyncio.run(bench.measure(_async(refused), {}))
    assert info.value.status == 400 and info.value.message == "bad kv budget"


def test_without_usage_the_output_is_counted_in_chunks():
    def handler(request):
        return httpx.Response(200, content=_sse(_chunk(), _chunk(), "[DONE]"))

    result = asyncio.run(bench.measure(_async(handler), {}))
    assert result["output_tokens"] == 2 and result["prompt_tokens"] is None


# ---------------------------------------------------------------------------------------------
# whole runs against stand-in servers

# seconds before the first token and between tokens, per flux mode of the request
DELAYS = {"full": (0.08, 0.03), "sparse": (0.01, 0.005)}


class StandIn(JsonHandler):
    """A streaming completions server. `fluxserve` makes it declare flux/kv_policy/ignore_eos
    and answer /tokenize (one token per word, its length as the id)."""

    fluxserve = True
    bodies: list[dict] = []
    lock = threading.Lock()

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, {"data": [{"id": "stand-in", "max_model_len": 600}]})
        elif self.path == "/openapi.json" and self.fluxserve:
            props = {"flux": {}, "kv_policy": {}, "ignore_eos": {}, "min_tokens": {}}
            self._send(200, {"components": {"schemas": {
                "ChatRequest": {"properties": props},
                "CompletionsRequest": {"properties": props}}}})
        else:
            self._send(404, {"detail": "Not Found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize" and self.fluxserve:
            tokens = [len(w) for w in body["prompt"].split()]
            self._send(200, {"tokens": tokens, "count": len(tokens)})
            return
        if self.path != "/v1/completions":
            self._send(404, {"detail": "Not Found"})
            return
        with self.lock:
            type(self).bodies.append(body)
        if (body.get("kv_policy") or {}).get("name") == "snapkv":
            self._send(400, {"error": {"message": "snapkv is off here", "type": "BadRequest"}})
            return
        first, step = DELAYS[(body.get("flux") or {"mode": "full"})["mode"]]
        prompt = body["prompt"]
        n_prompt = len(prompt) if isinstance(prompt, list) else len(prompt) // 4
        # without ignore_eos the stand-in "meets EOS" after 2 tokens
        n_out = body["max_tokens"] if body.get("ignore_eos") else min(2, body["max_tokens"])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        time.sleep(first)
        for i in range(n_out):
            if i:
                time.sleep(step)
            self.wfile.write(_sse(_chunk("x", "length" if i == n_out - 1 else None)))
            self.wfile.flush()
        self.wfile.write(_sse({"choices": [], "usage": {
            "prompt_tokens": n_prompt, "completion_tokens": n_out}}, "[DONE]"))
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture()
def stand_in():
    with ExitStack() as servers:
        def start(fluxserve: bool) -> str:
            handler = type("Handler", (StandIn,), {"fluxserve": fluxserve, "bodies": []})
            start.handler = handler
            return servers.enter_context(serve(handler))

        yield start


def test_run_against_a_fluxserve_like_server(stand_in, tmp_path, capsys):
    url = stand_in(fluxserve=True)
    out = tmp_path / "bench"
    summary = bench.run(BenchConfig(
        url=url, lengths=[256, 512, 1024], policies=["sparse", "snapkv:64"], output_tokens=4,
        concurrency=2, repeats=2, warmup=1, out=str(out), progress=False, max_retries=0))
    bodies = stand_in.handler.bodies
    assert list(summary["policies"]) == ["full", "sparse"]
    notes = " ".join(summary["notes"])
    assert "skipped policy snapkv:64" in notes and "snapkv is off here" in notes
    assert "skipped lengths [1024]" in notes  # 1024 + 4 > max_model_len 600
    assert summary["exact_lengths"] and summary["fixed_output_length"] == ["ignore_eos",
                                                                           "min_tokens"]

    sweep = [b for b in bodies if len(b["prompt"]) in (256, 512)]
    assert len(sweep) == 2 * 2 * 3 * 2  # lengths x policies x (warm-up + repeats) x streams
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True}
               and b["ignore_eos"] is True and "min_tokens" not in b and b["max_tokens"] == 4
               and b["kv_policy"] == {"name": "none"} for b in sweep)
    assert Counter(b["flux"]["mode"] for b in sweep) == {"full": 12, "sparse": 12}
    assert len({tuple(b["prompt"][:16]) for b in sweep}) == len(sweep)

    rows = {(r["length"], r["policy"]): r for r in summary["rows"]}
    assert set(rows) == {(256, "full"), (256, "sparse"), (512, "full"), (512, "sparse")}
    for row in rows.values():
        assert row["requests"] == 4 and row["errors"] == 0 and row["output_tokens"] == 4
        assert row["ttft_ms_p50"] > 0 and row["tpot_ms_p50"] > 0
    for n in (256, 512):
        assert rows[(n, "full")]["ttft_ms_p50"] >= 80 and rows[(n, "full")]["tpot_ms_p50"] >= 30
        assert rows[(n, "sparse")]["ttft_speedup"] > 1 and rows[(n, "sparse")]["tpot_speedup"] > 1
        assert rows[(n, "full")]["ttft_speedup"] == 1.0

    with (out / "summary.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [(int(r["length"]), r["policy"]) for r in csv_rows] == [
        (256, "full"), (256, "sparse"), (512, "full"), (512, "sparse")]
    with (out / "requests.csv").open() as f:
        requests = list(csv.DictReader(f))
    assert len(requests) == 24 and sum(r["warmup"] == "True" for r in requests) == 8
    for name in ("ttft_vs_length.png", "tpot_vs_length.png", "speedup.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    assert json.loads((out / "summary.json").read_text())["rows"] == summary["rows"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-4:] == ["TTFT", "speedup", "TPOT", "speedup"]
    assert [line.split()[:2] for line in lines[2:6]] == [
        ["256", "full"], ["256", "sparse"], ["512", "full"], ["512", "sparse"]]


def test_run_against_a_plain_server_sends_no_extension_fields(stand_in, tmp_path):
    url = stand_in(fluxserve=False)
    summary = bench.run(BenchConfig(url=url, lengths=[64], policies=["full", "sparse"],
                                    output_tokens=4, repeats=1, warmup=0, out=str(tmp_path),
                                    progress=False, max_retries=0))
    bodies = stand_in.handler.bodies
    assert list(summary["policies"]) == ["full"]
    assert all("flux" not in b and "kv_policy" not in b and "ignore_eos" not in b
               for b in bodies)
    assert all(isinstance(b["prompt"], str) for b in bodies)  # no tokenizer: text prompts
    notes = " ".join(summary["notes"])
    assert "skipped policy sparse" in notes and "approximate" in notes
    assert "neither ignore_eos nor min_tokens" in notes and "generated other than 4" in notes
    (row,) = summary["rows"]
    assert row["output_tokens"] == 2 and row["ttft_speedup"] == 1.0
    assert not (tmp_path / "speedup.png").exists()


def test_bad_options_and_unreachable_server(tmp_path):
    with pytest.raises(ValueError, match="lengths"):
        bench.run(BenchConfig(lengths=[8], out=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown part"):
        bench.run(BenchConfig(policies=["fast"], out=str(tmp_path)))
    with pytest.raises(BenchError, match="cannot list"):
        bench.run(BenchConfig(url="http://127.0.0.1:9", out=str(tmp_path), progress=False,
                              max_retries=0, timeout_s=2))
