"""Which attention runs on the CPU (vllm_glue.backend_cpu), in the shared in-process engine of
the embedded model:

- a batch whose requests have no option (or the server's explicit defaults, ``full`` and
  ``none``) is exactly vLLM's CPU path: vLLM's metadata and kernel, none of ours;
- in a mixed batch (one dense request, one sparse with a one-block sink and window, one sparse
  with a 4-token sink and a 24-token window, one CaliDrop), each row gets the tokens it gets
  alone, and the three paths (vLLM's kernel on real block tables, vLLM's kernel with its
  sliding window over virtual ones, ops.paged_attention) run in the same steps;
- greedy dense output equals stock vLLM's (no plugin at all) on the same checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.conftest import CHUNK, MAX_MODEL_LEN

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 16
_rng = random.Random(7)
PROMPTS = {  # 700 tokens: two prefill chunks
    name: [_rng.randrange(10, 2000) for _ in range(n)]
    for name, n in (("dense", 300), ("sparse", 700), ("windowed", 600), ("calidrop", 500))}
BLOCK = 128  # vLLM's CPU default
OPTIONS = {
    "dense": None,
    "sparse": {"flux": {"mode": "sparse", "sink": 4, "window": 24}},
    "windowed": {"flux": {"mode": "sparse", "sink": BLOCK, "window": 2 * BLOCK}},
    "calidrop": {"kv_policy": {"name": "calidrop", "budget": 192, "window": 8}},
}
SERVER_DEFAULTS = {"flux": {"mode": "full"}, "kv_policy": {"name": "none"}}


class Paths:
    """Counts, per engine step, what the CPU backend ran."""

    def __init__(self, monkeypatch) -> None:
        from vllm import _custom_ops

        from attention_backends.vllm_glue import backend_cpu

        self.steps: list[bool] = []  # per built metadata: did it carry a fluxserve step
        self.ours: list[list[int]] = []  # rows per call of our attention
        self.vllm_rows: list[tuple[int, int]] = []  # (rows, sliding window) per vLLM call
        self.sink_calls: list[int] = []  # query heads per vLLM call with a sink logit

        build, attend = backend_cpu.step_metadata_for, backend_cpu.attend
        kernel = _custom_ops.cpu_attention_with_kv_cache

        def step_metadata_for(*a, **kw):
            step = build(*a, **kw)
            self.steps.append(step is not None)
            return step

        def counted_attend(*a, rows=None, **kw):
            self.ours.append(list(rows))
            return attend(*a, rows=rows, **kw)

        def counted_kernel(*a, **kw):
            self.vllm_rows.append((int(kw["seq_lens"].shape[0]), kw["sliding_window"]))
            if kw["s_aux"] is not None:
                self.sink_calls.append(int(kw["query"].shape[1]))
            return kernel(*a, **kw)

        monkeypatch.setattr(backend_cpu, "step_metadata_for", step_metadata_for)
        monkeypatch.setattr(backend_cpu, "attend", counted_attend)
        monkeypatch.setattr(_custom_ops, "cpu_attention_with_kv_cache", counted_kernel)


def llm_heads(llm) -> int:
    return llm.llm_engine.model_config.get_num_attention_heads(
        llm.llm_engine.vllm_config.parallel_config)


def _generate(llm, names: list[str], options: list[dict | None],
              ignore_eos: bool = True) -> list[list[int]]:
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=ignore_eos,
                             extra_args=o) for o in options]
    outs = llm.generate([{"prompt_token_ids": PROMPTS[n]} for n in names], params,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("options", [None, SERVER_DEFAULTS], ids=["no options", "defaults"])
def test_a_batch_without_options_is_vllms_cpu_path(llm, monkeypatch, options):
    paths = Paths(monkeypatch)
    _generate(llm, list(PROMPTS), [options] * len(PROMPTS))
    assert paths.steps and not any(paths.steps)  # vLLM's own metadata, every step
    assert paths.ours == []
    assert paths.vllm_rows and max(paths.vllm_rows) == (len(PROMPTS), -1)


def test_mixed_batch_rows_get_their_tokens_alone(llm, monkeypatch):
    names = list(PROMPTS)
    alone = [_generate(llm, [n], [OPTIONS[n]])[0] for n in names]
    paths = Paths(monkeypatch)
    mixed = _generate(llm, names, [OPTIONS[n] for n in names])
    for name, a, m in zip(names, alone, mixed, strict=True):
        assert m == a, name
    # decode steps: the 4-token-sink row through ours, the dense one through vLLM's kernel as
    # a one-row sub-batch, the windowed one through vLLM's kernel with the window sink +
    # window, the compressed one through vLLM's kernel with its heads doubled and a sink logit
    assert [1] in paths.ours and not any(len(rows) > 1 for rows in paths.ours)
    assert (1, -1) in paths.vllm_rows and (1, 3 * BLOCK) in paths.vllm_rows
    assert paths.sink_calls and set(paths.sink_calls) == {2 * llm_heads(llm)}


def test_dense_output_matches_stock_vllm(llm, tmp_path):
    names = list(PROMPTS)
    ours = [_generate(llm, [n], [None], ignore_eos=False)[0] for n in names]
    job = {"model": llm.llm_engine.model_config.model,
           "engine": dict(enforce_eager=True, max_model_len=MAX_MODEL_LEN, max_num_seqs=16,
                          max_num_batched_tokens=CHUNK, enable_chunked_prefill=True,
                          enable_prefix_caching=False, seed=0),
           "requests": [{"prompt": PROMPTS[n], "max_tokens": MAX_TOKENS} for n in names]}
    job_file, out_file = tmp_path / "stock.json", tmp_path / "stock.out.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "VLLM_PLUGINS": "", "VLLM_CPU_KVCACHE_SPACE": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "flux" / "engine_job.py"),
                           str(job_file), str(out_file)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stock = json.loads(out_file.read_text())["tokens"]
    assert ours == stock
