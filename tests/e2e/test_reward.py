"""`/v1/reward` end to end: scalar (the embedded reward model, a second engine) and judge (the
chat model) over HTTP, with the official `openai` client's raw requests and `httpx`; the
reward-bench evaluator on a generated fixture file.

The smoke-test models have random weights: scalar scores are arbitrary but deterministic, and
the judge writes no verdict, so judge tests check the pipeline and the `preferred: null` path.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.reward.default_model import DEFAULT_REWARD_MODEL_NAME, ensure_default_reward_model
from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e

CONTEXT = [{"role": "system", "content": "Answer from the document."},
           {"role": "user", "content": "Document: the tower is 330 m tall. How tall is it?"}]
CANDIDATES = ["It is 330 metres tall.", "About 100 m.", "Unknown.", "330 m, per the document."]
JUDGE = {"mode": "judge", "max_tokens": 8}
# The byte-level tokenizer packs a few characters per token: this is thousands of tokens.
LONG_DOC = "The tower was built in stages and repainted often. " * 400


def _item(**kw) -> dict:
    return {"messages": CONTEXT, "candidates": CANDIDATES[:2], "mode": "scalar", **kw}


def _post(server, items: list[dict], timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/reward", json={"items": items},
                      headers=server.auth, timeout=timeout)


def _ok(server, items: list[dict]) -> dict:
    resp = _post(server, items)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _assert_error(resp: httpx.Response, status: int, needle: str) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error) and error["code"] == status
    assert needle.lower() in (error["message"] + str(error["param"])).lower(), error


def _wait_idle(server) -> dict:
    """/ready once both engines have no unfinished requests (aborts are asynchronous)."""
    deadline = time.monotonic() + 30
    while True:
        ready = httpx.get(f"{server.base_url}/ready", timeout=10).json()
        if ready["unfinished_requests"] == 0 or time.monotonic() > deadline:
            return ready
        time.sleep(0.2)


def test_models_lists_the_reward_model(server):
    cards = {c["id"]: c for c in server.client().models.list().model_dump()["data"]}
    assert MODEL in cards
    card = cards[DEFAULT_REWARD_MODEL_NAME]
    assert "smoke-test" in card["owned_by"] and card["max_model_len"] == 2048


def test_scalar_pairwise_with_openai_client(server):
    before = server.metric("fluxserve:reward_requests_total", mode="scalar")
    raw = server.client().post("/reward", cast_to=httpx.Response,
                               body={"items": [_item()]})
    assert raw.status_code == 200
    body = raw.json()
    assert body["object"] == "reward" and len(body["data"]) == 1
    result = body["data"][0]
    scores = [c["score"] for c in result["candidates"]]
    assert [c["index"] for c in result["candidates"]] == [0, 1]
    assert all(isinstance(s, float) for s in scores) and scores[0] != scores[1]
    assert result["preferred"] == max(range(2), key=scores.__getitem__)
    assert result["model"] == DEFAULT_REWARD_MODEL_NAME and result["reason"] is None
    assert result["truncated"] is False and result["truncation"] == []
    assert result["usage"]["prompt_tokens"] > 0 and result["usage"]["completion_tokens"] == 0
    assert body["usage"]["prompt_tokens"] == result["usage"]["prompt_tokens"]
    assert server.metric("fluxserve:reward_requests_total", mode="scalar") == before + 1
    assert server.metric("fluxserve:reward_scoring_seconds_count", mode="scalar") >= 1
    # Each candidate is scored on its own: the same candidate keeps its score in another order.
    again = _ok(server, [_item(candidates=CANDIDATES[:2][::-1])])["data"][0]
    assert [c["score"] for c in again["candidates"]] == pytest.approx(scores[::-1], rel=1e-3)


def test_scalar_score_is_the_reward_models_first_logit(server):
    """The served score equals Hugging Face's LlamaForSequenceClassification logit on the same
    chat-template text (float32 there, bf16 in the engine: close, not equal)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = ensure_default_reward_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    expected = []
    for candidate in CANDIDATES[:3]:
        text = tokenizer.apply_chat_template(
            CONTEXT + [{"role": "assistant", "content": candidate}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            expected.append(model(input_ids=ids).logits[0][0].item())
    result = _ok(server, [_item(candidates=CANDIDATES[:3])])["data"][0]
    assert [c["score"] for c in result["candidates"]] == pytest.approx(expected, abs=0.03)


def test_scalar_best_of_n_batched(server):
    items = [_item(candidates=CANDIDATES), _item(candidates=CANDIDATES[1:], model=None),
             _item(candidates=CANDIDATES[:2], model=DEFAULT_REWARD_MODEL_NAME)]
    data = _ok(server, items)["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    assert [len(d["candidates"]) for d in data] == [4, 3, 2]
    for d in data:
        scores = [c["score"] for c in d["candidates"]]
        assert d["preferred"] == max(range(len(scores)), key=scores.__getitem__)
    # candidates shared between items get the same score (same context, same model)
    assert data[1]["candidates"][0]["score"] == pytest.approx(
        data[0]["candidates"][1]["score"], rel=1e-3)


def test_judge_pairwise_with_swap(server):
    before = server.metric("fluxserve:reward_judge_parse_failures_total", judge_prompt="pairwise")
    result = _ok(server, [_item(**JUDGE, swap=True)])["data"][0]
    assert result["model"] == MODEL and result["judge_prompt"] == "pairwise"
    given, reversed_ = result["judgments"]
    assert (given["order"], given["shown"]) == ("given", [0, 1])
    assert (reversed_["order"], reversed_["shown"]) == ("reversed", [1, 0])
    for j in (given, reversed_):
        assert isinstance(j["text"], str) and j["finish_reason"] in ("length", "stop")
        if j["ranking"] is None:  # random weights: no verdict expected, but never guessed
            assert "no verdict" in j["error"] or "conflicting" in j["error"]
    if result["preferred"] is None:
        assert result["reason"] and all(c["rank"] is None for c in result["candidates"])
    failures = sum(j["ranking"] is None for j in result["judgments"])
    assert server.metric("fluxserve:reward_judge_parse_failures_total",
                         judge_prompt="pairwise") == before + failures
    assert 0 < result["usage"]["completion_tokens"] <= 16
    assert result["usage"]["total_tokens"] == (result["usage"]["prompt_tokens"]
                                               + result["usage"]["completion_tokens"])


def test_judge_is_greedy_and_ranks_best_of_n(server):
    item = _item(**JUDGE, candidates=CANDIDATES[:3], flux={"mode": "sparse", "window": 64},
                 kv_policy={"name": "snapkv", "budget": 64, "window": 8})
    first, second = _ok(server, [item, item])["data"]
    assert first["judge_prompt"] == "ranking" and len(first["judgments"]) == 1
    assert first["judgments"][0]["text"] == second["judgments"][0]["text"]
    assert first["swap_agreement"] is None
    if first["preferred"] is None:
        assert "ranking" in first["reason"]


def test_scalar_truncates_long_context_head_and_tail(server):
    long_ctx = [{"role": "user", "content": LONG_DOC + "How tall is the tower?"}]
    result = _ok(server, [_item(messages=long_ctx)])["data"][0]
    assert result["truncated"] is True
    assert [t["candidate"] for t in result["truncation"]] == [0, 1]
    for t in result["truncation"]:
        assert t["budget_tokens"] == 2048 and t["original_tokens"] > 2048
        assert (t["head_tokens"], t["tail_tokens"]) == (1024, 1023)
        assert t["kept_tokens"] == 2047
    assert result["usage"]["prompt_tokens"] == 2 * 2047


def test_judge_truncates_long_context(server):
    long_ctx = [{"role": "user", "content": LONG_DOC}]
    result = _ok(server, [_item(**JUDGE, messages=long_ctx, swap=True)])["data"][0]
    assert result["truncated"] is True
    assert [t["order"] for t in result["truncation"]] == ["given", "reversed"]
    budget = 2048 - JUDGE["max_tokens"]
    assert all(t["budget_tokens"] == budget and t["kept_tokens"] <= budget
               for t in result["truncation"])


BAD_ITEMS = {
    "one candidate": (_item(candidates=["only"]), 400, "candidates"),
    "empty candidate": (_item(candidates=["a", " "]), 400, "must not be empty"),
    "empty message": (_item(messages=[{"role": "user", "content": ""}]), 400, "empty"),
    "unknown mode": (_item(mode="vote"), 400, "mode"),
    "swap in scalar mode": (_item(swap=True), 400, "swap"),
    "unknown model": (_item(model="no-such-model"), 404, "does not exist"),
    "judge with the reward model's name": (_item(**JUDGE, model=DEFAULT_REWARD_MODEL_NAME), 404,
                                           "does not exist"),
    "bad kv policy": (_item(**JUDGE, kv_policy={"name": "bogus"}), 400, "kv_policy"),
    "flux auto without router": (_item(**JUDGE, flux={"mode": "auto"}), 400, "router"),
    "max_tokens fills the context": (_item(mode="judge", max_tokens=2048), 400, "max_tokens"),
    "scalar candidate too long": (_item(candidates=["short", LONG_DOC]), 400, "too long"),
    "judge candidates too long": (_item(**JUDGE, candidates=[LONG_DOC, "short"]), 400,
                                  "too long"),
}


@pytest.mark.parametrize("case", list(BAD_ITEMS))
def test_bad_items_get_openai_errors(server, case):
    item, status, needle = BAD_ITEMS[case]
    # a valid item next to the bad one: the whole request fails before any engine work
    _assert_error(_post(server, [_item(), item]), status, needle)


@pytest.mark.parametrize("body, needle", [({}, "items"), ({"items": []}, "items"),
                                          ({"items": [_item()], "extra": 1}, "extra")])
def test_bad_requests(server, body, needle):
    resp = httpx.post(f"{server.base_url}/v1/reward", json=body, headers=server.auth, timeout=60)
    _assert_error(resp, 400, needle)


def test_requires_api_key(server):
    resp = httpx.post(f"{server.base_url}/v1/reward", json={"items": [_item()]}, timeout=60)
    _assert_error(resp, 401, "api key")


def test_concurrent_requests_leave_nothing_behind(server):
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=server.auth, timeout=180) as client:
            bodies = [{"items": [_item(candidates=CANDIDATES[: 2 + i % 3])]} if i % 2 else
                      {"items": [_item(**JUDGE, candidates=CANDIDATES[: 2 + i % 3], swap=True)]}
                      for i in range(8)]
            return await asyncio.gather(*(client.post(f"{server.base_url}/v1/reward", json=b)
                                          for b in bodies))

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 8
    ready = _wait_idle(server)
    assert ready["unfinished_requests"] == 0 and ready["reward_unfinished_requests"] == 0


def test_client_disconnect_aborts_judge_requests(server):
    """A client that stops waiting for a judge reply has its engine requests aborted and is
    counted as disconnected. Sixteen judge items with swapped orders are dozens of long
    generations (seconds even at vLLM's own CPU speed); a client starved of CPU for longer than
    all of them gets its reply instead, and the attempt is repeated (a bounded number of times)."""
    items = [_item(mode="judge", max_tokens=1500, candidates=CANDIDATES[:3], swap=True)] * 16

    def disconnected() -> float:
        return server.metric("fluxserve:requests_disconnected_total", endpoint="reward")

    for _ in range(3):
        assert _wait_idle(server)["unfinished_requests"] == 0
        before = disconnected()
        try:
            reply = httpx.post(f"{server.base_url}/v1/reward", json={"items": items},
                               headers=server.auth, timeout=httpx.Timeout(60, read=1.0))
        except httpx.ReadTimeout:
            pass
        else:
            assert reply.status_code == 200, reply.text
            continue
        assert _wait_idle(server)["unfinished_requests"] == 0, "judge requests not aborted"
        deadline = time.monotonic() + 10
        while disconnected() != before + 1:
            assert time.monotonic() < deadline, "reward disconnect not counted"
            time.sleep(0.2)
        return
    pytest.fail("every attempt's judge reply came back within the client's 1 s read timeout")


def _bench_fixture(path: Path) -> int:
    records = []
    for i, length in enumerate(["4k", "8k", "4k", "8k"]):
        records.append({"prompt_template": CONTEXT, "chosen": CANDIDATES[0],
                        "rejected": CANDIDATES[1 + i % 3], "tasktype": "PairWise",
                        "subtype": "same" if i % 2 else "diff", "ctx_length_for_length": length})
    for n in (2, 3, 4):
        records.append({"prompt_template": CONTEXT, "candidates": CANDIDATES[:n],
                        "tasktype": "BestOfN", "subtype": str(n), "ctx_length_for_length": "16k",
                        "task": "Rank"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return len(records)


@pytest.mark.parametrize("mode", ["scalar", "judge"])
def test_reward_bench_cli(server, tmp_path, mode):
    data = tmp_path / "LongQA.jsonl"
    n = _bench_fixture(data)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "server.cli", "reward-bench", str(data), "--url",
           server.base_url, "--api-key", server.api_key, "--mode", mode, "--max-tokens", "8",
           "--concurrency", "3", "--out-dir", str(out), "--quiet"]
    if mode == "judge":
        cmd += ["--kv-policy", "snapkv", "--flux", "full"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout and "LongQA" in proc.stdout and "Rank" in proc.stdout
    rows = (out / "results.csv").read_text().splitlines()
    overall = [r for r in rows if r.startswith("overall,")]
    assert overall and overall[0].split(",")[3] == str(n)
    assert {r.split(",")[1] for r in rows if r.startswith("length,")} == {"4K", "8K", "16K"}
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
