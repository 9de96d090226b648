"""When our prefill sends attention to cuDNN (``sdpa_prefill.cudnn_attention_ok``), including a
cuDNN runtime that torch's Python check refuses once (seen with torch 2.13 over cuDNN 9.19 on
the H200, where torch's own SDPA dispatcher still runs cuDNN's attention)."""

from __future__ import annotations

import pytest
import torch

from attention_backends.kernels import sdpa_prefill


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    sdpa_prefill._cudnn_ok.cache_clear()
    yield monkeypatch
    sdpa_prefill._cudnn_ok.cache_clear()


def _versions(monkeypatch, answers):
    calls = iter(answers)

    def version():
        a = next(calls)
        if isinstance(a, Exception):
            raise a
        return a

    monkeypatch.setattr(torch.backends.cudnn, "version", version)


@pytest.mark.parametrize("answers,ok", [
    ([91900], True),
    ([RuntimeError("cuDNN version incompatibility"), 91900], True),  # refused once, then read
    ([RuntimeError("x"), RuntimeError("x")], False),
    ([91400], False),  # below MIN_CUDNN_VERSION: torch prefers flash there too
    ([None], False),
])
def test_cudnn_gate(gpu, answers, ok):
    _versions(gpu, answers)
    assert sdpa_prefill._cudnn_ok(0) is ok


def test_not_on_cpu_or_other_gpus(gpu):
    _versions(gpu, [91900])
    assert sdpa_prefill.cudnn_attention_ok(torch.device("cpu")) is False
    gpu.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    assert sdpa_prefill._cudnn_ok(0) is False
