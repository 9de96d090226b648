"""The whole `fluxserve eval` run against a plain OpenAI-compatible server on loopback: a small
stand-in that answers needle questions correctly, publishes no fluxserve fields and no
/tokenize, and reports attention accounting in `usage`."""

from __future__ import annotations

import json
import re

import pytest

from evaluation.long_context import EvalConfig, EvalError, run
from tests.eval.conftest import TOKENIZER_JSON
from tests.eval.stand_in import JsonHandler, serve


class OracleHandler(JsonHandler):
    bodies: list[dict] = []

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, {"data": [{"id": "oracle", "max_model_len": 3000}]})
        else:
            self._send(404, {"detail": "Not Found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            self._send(404, {"detail": "Not Found"})
            return
        type(self).bodies.append(body)
        prompt = body["messages"][-1]["content"]
        key = re.search(r"special magic \w+ for (.+?) mentioned in the provided text\?",
                        prompt)
        answer = "none"
        if key:
            found = re.search(rf"for {re.escape(key.group(1))} is: (\S+)\.", prompt)
            answer = found.group(1) if found else "none"
        self._send(200, {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1,
                      "fluxserve": {"attention_flops_saved": 3, "attention_flops_dense": 4}}})


@pytest.fixture()
def oracle_url():
    OracleHandler.bodies = []
    with serve(OracleHandler) as url:
        yield url


def test_full_run_on_a_plain_server(oracle_url, tmp_path):
    out = tmp_path / "run"
    summary = run(EvalConfig(url=oracle_url, tasks=["niah_single_1", "niah_multikey_3"],
                             lengths=[1024, 2048, 4096], policies=["full", "snapkv:512"],
                             samples=2, tokenizer=str(TOKENIZER_JSON), out=str(out),
                             progress=False, max_retries=0))
    # only `full` runs where the fluxserve fields are not declared, and nothing extra is sent
    assert list(summary["policies"]) == ["full"]
    assert all("flux" not in b and "kv_policy" not in b for b in OracleHandler.bodies)
    assert all(b["temperature"] == 0 for b in OracleHandler.bodies)
    assert summary["lengths"] == [1024, 2048]  # 4096 is over the model's 3000
    notes = " ".join(summary["notes"])
    assert "snapkv:512" in notes and "4096" in notes and "pre-filled" in notes
    rows = {(r["task"], r["length"]): r for r in summary["rows"]}
    assert rows[("niah_single_1", 1024)]["accuracy"] == 100.0
    assert rows[("niah_multikey_3", 2048)]["accuracy"] == 100.0
    assert rows[("average", 2048)]["attention_work_saved"] == 0.75
    for name in ("summary.csv", "summary.json", "results.jsonl", "accuracy_vs_length.png",
                 "accuracy_vs_length_by_task.png", "accuracy_vs_work_saved.png"):
        assert (out / name).stat().st_size > 0, name
    assert len((out / "results.jsonl").read_text().splitlines()) == 8

    # a rerun finds everything done and sends no generation request
    sent = len(OracleHandler.bodies)
    run(EvalConfig(url=oracle_url, tasks=["niah_single_1", "niah_multikey_3"],
                   lengths=[1024, 2048], policies=["full"], samples=2,
                   tokenizer=str(TOKENIZER_JSON), out=str(out), progress=False))
    assert len(OracleHandler.bodies) - sent == 1  # the chat probe only

    # the same folder with another seed is refused rather than mixed
    with pytest.raises(EvalError, match="seed"):
        run(EvalConfig(url=oracle_url, tasks=["niah_single_1"], lengths=[1024], seed=7,
                       tokenizer=str(TOKENIZER_JSON), out=str(out), progress=False))


def test_unreachable_server_is_an_error(tmp_path):
    with pytest.raises(EvalError, match="cannot list"):
        run(EvalConfig(url="http://127.0.0.1:9", out=str(tmp_path), progress=False,
                       max_retries=0, timeout_s=2))


def test_without_any_tokenizer_lengths_are_approximate_and_said_so(oracle_url, tmp_path):
    summary = run(EvalConfig(url=oracle_url, tasks=["niah_single_1"], lengths=[1024],
                             policies=["full"], samples=1, out=str(tmp_path), progress=False))
    assert "approximation" in summary["tokenizer"]
    assert any("approximate" in note for note in summary["notes"])
    sample = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])["sample"]
    chars = len(sample["prompt"] + sample["answer_prefix"])
    assert 0.98 * 1024 <= chars / 4 + sample["max_tokens"] <= 1024 + 1
