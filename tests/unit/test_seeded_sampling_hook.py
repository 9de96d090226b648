"""The seeded-sampling hooks of ``attention_backends.vllm_glue.vllm_private`` on a stand-in runner
that does what vLLM 0.32's ``GPUModelRunner`` does with per-request generators (the engine-level
behaviour is tested in tests/engine/test_seeded_chunked_prefill.py)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from attention_backends.vllm_glue import vllm_private as vp


class _Runner:
    """Samples one number per row; discarded rows' generators are rewound as vLLM does."""

    def __init__(self, generators: dict[int, torch.Generator], discard: list[bool]) -> None:
        self.input_batch = types.SimpleNamespace(generators=generators, num_reqs=len(discard))
        self.discard_request_mask = types.SimpleNamespace(np=np.array(discard))

    def _sample(self, logits, spec_decode_metadata):
        return {i: torch.rand(1, generator=g).item()
                for i, g in self.input_batch.generators.items()}

    def _bookkeeping_sync(self, scheduler_output, sampler_output, logits, hidden_states,
                          num_scheduled_tokens):
        for i in np.nonzero(self.discard_request_mask.np)[0]:
            gen = self.input_batch.generators.get(int(i))
            if gen is not None:
                gen.set_offset(gen.get_offset() - 4)  # CUDA-only: raises on CPU generators


def _step(runner):
    out = runner._sample(None, None)
    runner._bookkeeping_sync(None, out, None, None, 0)
    return out


def test_stock_rewind_fails_on_cpu_generators():
    runner = _Runner({0: torch.Generator().manual_seed(1)}, [True])
    with pytest.raises(RuntimeError, match="offset"):
        _step(runner)


def test_hook_keeps_discarded_rows_streams_unchanged():
    cls = type("Runner", (_Runner,), {})
    for _ in range(2):  # idempotent
        vp._wrap(cls, "_sample", vp._make_sample)
        vp._wrap(cls, "_bookkeeping_sync", vp._make_bookkeeping_sync)
    kept, discarded = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    runner = cls({0: kept, 1: discarded}, [False, True])
    generators = runner.input_batch.generators
    _step(runner)
    assert runner.input_batch.generators is generators  # the batch's own dict is back
    reference = torch.Generator().manual_seed(2)
    # the discarded row's stream did not advance; the kept row's did
    assert torch.rand(1, generator=discarded).item() == torch.rand(1, generator=reference).item()
    fresh = torch.Generator().manual_seed(1)
    torch.rand(1, generator=fresh)
    assert torch.rand(1, generator=kept).item() == torch.rand(1, generator=fresh).item()


def test_hooked_sampling_methods_are_checked_private_hooks():
    names = {(h.owner, h.name) for h in vp.PRIVATE_HOOKS}
    assert {("GPUModelRunner", "_sample"), ("GPUModelRunner", "_bookkeeping_sync")} <= names
