"""`fluxserve serve --model <Flux checkpoint>`: the checkpoint's routers serve `flux.mode=auto`."""

from __future__ import annotations

import re
import shutil

import pytest

from server.default_model import ensure_default_model
from tests.e2e.conftest import launch_server
from tests.flux.tiny_models import make_paw

pytestmark = pytest.mark.e2e

NAME = "tiny-flux"


@pytest.fixture(scope="module")
def flux_server(tmp_path_factory):
    base = ensure_default_model()
    ckpt = make_paw(tmp_path_factory.mktemp("paw") / "ckpt", base)
    for f in base.glob("tokenizer*"):  # the released checkpoints ship their tokenizer
        shutil.copy(f, ckpt / f.name)
    shutil.copy(base / "special_tokens_map.json", ckpt)
    # --warmup on: the CPU path compiles nothing, so `auto` would skip it here
    with launch_server(["--model", str(ckpt), "--served-model-name", NAME, "--warmup", "on"],
                       tmp_path_factory.mktemp("flux-server")) as srv:
        yield srv


WARMUP_CASES = ["none", "full", "sparse", "layers", "streaming", "snapkv", "calidrop",
                "sparse+calidrop", "auto"]


def test_warmup_ran_every_path_before_ready_and_outside_fluxserve_counters(flux_server):
    """Runs first in this module: nothing but the warm-up has been served yet."""
    log = flux_server.log_path.read_text()
    line = next(ln for ln in log.splitlines() if "warm-up:" in ln)
    assert f"{len(WARMUP_CASES)} cases ({', '.join(WARMUP_CASES)})" in line
    # the prompts fit the model: 2048 positions less the 4 decoded tokens, and 96
    assert "prompts of 2044 and 96 tokens" in line
    assert log.index("warm-up:") < log.index("engine ready")
    # no room for two full chunks in 2048 positions: phases 1, 3 and 4 (docs: server/warmup.py)
    assert " alone" not in line
    batch = int(re.search(r"decode batches of (\d+)", line).group(1))
    assert 1 < batch <= 32  # min(32, the server's max_num_seqs)
    per_case = 2 + batch
    assert f"{per_case * len(WARMUP_CASES)} requests" in line
    # every request to its last token, in vLLM's counters only
    assert flux_server.metric("vllm:request_success_total") == per_case * len(WARMUP_CASES)
    assert flux_server.metric("fluxserve:request_prefill_seconds_count") == 0
    assert flux_server.metric("fluxserve:requests_total") == 0
    # the calidrop and sparse+calidrop cases: every one of their requests compresses
    assert flux_server.metric('fluxserve:kv_compressed_requests_total{policy="calidrop"}') \
        == 2 * per_case


def test_auto_mode_routes_with_the_checkpoint_routers(flux_server):
    before = flux_server.metric('fluxserve:sparse_layer_fraction_count{mode="auto"}')
    fraction = flux_server.metric('fluxserve:sparse_layer_fraction_sum{mode="auto"}')
    r = flux_server.client().chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "route me " * 80}], max_tokens=4,
        temperature=0, extra_body={"flux": {"mode": "auto"}})
    assert r.usage.completion_tokens == 4
    assert flux_server.metric('fluxserve:sparse_layer_fraction_count{mode="auto"}') == before + 1
    assert flux_server.metric("fluxserve:router_time_seconds_count") >= 1
    # usage.fluxserve counts the layers the routers actually sent to sparse attention (2 of 4
    # for this prompt with the tiny checkpoint's routers), as the worker's routing metric does
    acct = r.usage.model_extra["fluxserve"]
    fraction = flux_server.metric('fluxserve:sparse_layer_fraction_sum{mode="auto"}') - fraction
    assert 0 < acct["sparse_layers"] == round(fraction * acct["total_layers"])
    assert acct["attention_flops_saved"] > 0


def test_auto_is_repeatable_and_other_modes_still_work(flux_server):
    client = flux_server.client()
    msgs = [{"role": "user", "content": "same prompt " * 60}]
    outs = [client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=0,
                                           extra_body={"flux": {"mode": "auto"}}
                                           ).choices[0].message.content for _ in range(2)]
    assert outs[0] == outs[1]  # decided once per request, deterministically
    full = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=0,
                                          extra_body={"flux": {"mode": "full"}})
    assert full.choices[0].message.content
