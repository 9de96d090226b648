"""The tiny quality model served on the CPU and measured by `fluxserve eval` through the server.

`tests/assets/fluxserve-quality-tiny` is the `tiny` preset of `training/` (a 1.3 M-parameter
Llama trained on needle and local-copy tasks, docs/quality.md) with its trained Flux routers.
Unlike the smoke-test model it answers: full attention must reach the score it reliably reaches
on these tasks, so a change that breaks retrieval anywhere on the serving path (attention,
KV cache, prefill chunking, sampling, the chat template, the eval client) fails here. `auto`
(its routers) and `sparse` run too, for errors only: their accuracy is measured on the real
model, not asserted on the tiny one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import launch_server

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "tests" / "assets" / "fluxserve-quality-tiny"
NAME = "fluxserve-quality-tiny"
# Full-attention accuracy (%, mean over 512 and 1K tokens, 8 samples each) that the committed
# checkpoint must reach; it measured 100 on both tasks at both lengths (16 samples per cell,
# docs/quality.md; training_info.json in the checkpoint), so sampling noise never fails this,
# while a broken path (which scores near 0) always does.
FULL_MIN = {"niah_single_1": 60.0, "local_copy": 60.0}


@pytest.fixture(scope="module")
def quality_server(tmp_path_factory):
    if not (CKPT / "router" / "router.safetensors").is_file():
        pytest.fail(f"{CKPT} is missing: it is the committed tiny checkpoint with its routers "
                    "(docs/quality.md, the tiny model's results)")
    # one prefill chunk per prompt, so `auto` pools the whole prompt as in training
    with launch_server(["--model", str(CKPT), "--flux-router", str(CKPT / "router"),
                        "--served-model-name", NAME, "--max-num-batched-tokens", "2048"],
                       tmp_path_factory.mktemp("quality-server")) as srv:
        yield srv


def test_tiny_quality_model_reaches_its_full_attention_score(quality_server, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "server.cli", "eval", "--url", quality_server.base_url,
           "--api-key", quality_server.api_key, "--tasks", *FULL_MIN, "--lengths", "512", "1K",
           "--samples", "8", "--concurrency", "8", "--no-progress",
           "--policies", "full", "auto", "sparse", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["api"] == "chat" and summary["answer_prefix_prefilled"]
    rows = summary["rows"]
    assert all(r["errors"] == 0 for r in rows), rows
    assert {r["policy"] for r in rows} == {"full", "auto", "sparse"}
    # the routers keep what full attention retrieves (100 = 100 in every measured cell)
    auto = [r["accuracy"] for r in rows if r["task"] == "niah_single_1" and r["policy"] == "auto"]
    assert sum(auto) / 2 >= FULL_MIN["niah_single_1"], (auto, res.stdout)
    for task, minimum in FULL_MIN.items():
        scores = [r["accuracy"] for r in rows if r["task"] == task and r["policy"] == "full"]
        assert len(scores) == 2
        assert sum(scores) / 2 >= minimum, (task, scores, res.stdout)
