"""Start-up warm-up (server/warmup.py): which requests it sends, and that they fit the model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from attention_backends.flux.options import FluxOptions
from kv_policies.eviction.options import POLICY_NAMES
from server import warmup


def test_cases_cover_every_flux_mode_and_kv_policy():
    names = [c.name for c in warmup.cases(32, router=False)]
    assert names[:4] == ["none", "full", "sparse", "layers"]
    assert set(POLICY_NAMES) - {"none"} <= set(names)
    assert "sparse+calidrop" in names and "auto" not in names
    assert [c.name for c in warmup.cases(32, router=True)][-1] == "auto"
    layers = next(c for c in warmup.cases(32, router=False) if c.name == "layers")
    assert layers.flux.sparse_layers == list(range(16, 32))
    assert next(c for c in warmup.cases(1, router=False) if c.name == "layers"
                ).flux.sparse_layers == [0]


@pytest.mark.parametrize(("max_model_len", "batched", "expected"), [
    (131072, 16384, (16896, 96)),  # past one prefill chunk
    (131072, 2048, (2688, 96)),    # past the default sink + window
    (2048, 8192, (2044, 96)),      # capped by the model, with room for the decoded tokens
    (64, 64, (60, 60)),
])
def test_prompt_lengths_fit_the_model(max_model_len, batched, expected):
    assert warmup.prompt_lengths(max_model_len, batched) == expected


@pytest.mark.parametrize(("max_model_len", "batched", "seqs", "expected"), [
    # H200 serving: a full chunk over a full chunk's prefix, decode batches of 32
    (131072, 16384, 64, warmup.WarmupPlan(16896, 32768, 96, 32)),
    (20000, 16384, 64, warmup.WarmupPlan(16896, 19996, 96, 32)),  # capped by the model
    (2048, 8192, 256, warmup.WarmupPlan(2044, None, 96, 32)),     # no room: phase 2 skipped
    (131072, 2048, 8, warmup.WarmupPlan(2688, 4096, 96, 8)),      # batches within max_num_seqs
    (64, 64, 1, warmup.WarmupPlan(60, None, 60, 1)),
])
def test_plan_fits_the_model_and_the_scheduler(max_model_len, batched, seqs, expected):
    p = warmup.plan(max_model_len, batched, seqs)
    assert p == expected
    assert p.requests_per_case() == 2 + (p.chunked is not None) + (p.decode_batch
                                                                   if p.decode_batch > 1 else 0)
    for n in (p.long, p.short, p.chunked or 0):
        assert n + warmup.DECODE_TOKENS <= max_model_len


@pytest.mark.parametrize("prompt_len", [60, 96, 2044, 16896, 32768])
def test_every_case_builds_valid_options(prompt_len):
    for case in warmup.cases(32, router=True):
        extra = warmup._params(case, prompt_len).extra_args or {}
        if case.flux is not None:
            assert FluxOptions.model_validate(extra["flux"]).mode == case.flux.mode
        if case.kv_policy is not None:
            kv = extra["kv_policy"]
            assert kv["name"] == case.kv_policy and kv["budget"] < max(prompt_len, 128)


@pytest.mark.parametrize("choice", ["on", "off"])
def test_explicit_choices_ignore_the_platform(choice):
    assert warmup.enabled(choice) is (choice == "on")


def test_auto_is_off_on_the_cpu():
    assert warmup.enabled("auto") is False


def _gpu_serving():
    path = Path(__file__).parents[2] / "benchmarks" / "gpu_serving.py"
    spec = importlib.util.spec_from_file_location("gpu_serving", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gpu_serving_modes_are_valid_request_options():
    """The GPU serving benchmark builds its modes with fluxserve's own option models."""
    gs = _gpu_serving()
    for scale, check in ((gs.GPU, False), (gs.TINY, True)):
        modes = gs.mode_options(scale, check)
        assert list(modes) == gs.CHECK_MODES
        assert modes["calidrop"]["kv_policy"]["name"] == "calidrop"
        assert modes["layers90"]["flux"]["sparse_layers"][0] == max(1, round(scale.layers * 0.1))
