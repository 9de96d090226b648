"""The GPU backend's two paths (vllm_glue.backend_gpu), on stand-ins of vLLM's FlashAttention.

Dense steps (no Flux or KV-policy row: ``StepMetadata`` None) go to vLLM's FlashAttention
builder and impl, the rest to our kernels. The kernels themselves run on the GPU only; here the
dispatch is checked on the CPU with recording stand-ins.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.attention.backend import AttentionCGSupport

from attention_backends.vllm_glue import backend_gpu, metadata


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def build(self, common_prefix_len, cm, fast_build=False):
        self.calls.append(("build", common_prefix_len, fast_build))
        return "flash-metadata"

    def forward(self, layer, query, key, value, kv_cache, md, output):
        self.calls.append(("forward", md))
        output.fill_(1.0)
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        self.calls.append(("kv", slot_mapping.shape[0]))


def _cm(num_reqs: int = 2):
    qsl = torch.tensor([0, 3, 4], dtype=torch.int32)
    return SimpleNamespace(num_reqs=num_reqs, num_actual_tokens=4, max_query_len=3,
                           max_seq_len=10, query_start_loc=qsl, query_start_loc_cpu=qsl,
                           seq_lens=torch.tensor([3, 10], dtype=torch.int32),
                           seq_lens_cpu_upper_bound=torch.tensor([3, 10], dtype=torch.int32),
                           block_table_tensor=torch.zeros(2, 1, dtype=torch.int32),
                           slot_mapping=torch.arange(4))


def _builder():
    b = object.__new__(backend_gpu.FluxGPUMetadataBuilder)
    b.vllm_config = SimpleNamespace(speculative_config=None)
    b.num_layers = 4
    b.flash = _Recorder()
    b.graph = None
    return b


def test_the_backend_declares_full_graphs_for_uniform_decode_batches():
    assert backend_gpu.FluxGPUMetadataBuilder._cudagraph_support == \
        AttentionCGSupport.UNIFORM_BATCH


def test_a_dense_step_builds_flash_metadata_only(monkeypatch):
    monkeypatch.setattr(backend_gpu, "step_metadata_for", lambda cm, cfg, **kw: None)
    b = _builder()
    md = b.build(0, _cm())
    assert md.step is None and md.flash == "flash-metadata"
    assert md.query_start_loc_cpu is None  # no host copies on the dense path
    assert b.flash.calls == [("build", 0, False)]


def test_a_step_with_our_rows_skips_flash_metadata(monkeypatch):
    step = SimpleNamespace()
    monkeypatch.setattr(backend_gpu, "step_metadata_for", lambda cm, cfg, **kw: step)
    b = _builder()
    md = b.build(0, _cm())
    assert md.step is step and md.flash is None and md.query_start_loc_cpu == [0, 3, 4]
    assert b.flash.calls == []


def test_a_step_with_our_rows_on_a_full_graph_fails(monkeypatch):
    monkeypatch.setattr(backend_gpu, "step_metadata_for", lambda cm, cfg, **kw: object())
    metadata.note_graph(metadata.VLLM_FULL)
    try:
        with pytest.raises(RuntimeError, match="FULL CUDA graph"):
            _builder().build(0, _cm())
    finally:
        metadata.note_graph(None)


@pytest.mark.parametrize("dense", [True, False])
def test_forward_takes_the_steps_path(monkeypatch, dense):
    impl = object.__new__(backend_gpu.FluxGPUAttentionImpl)
    impl.flash, impl.scale = _Recorder(), 0.125
    ours = []
    monkeypatch.setattr(backend_gpu, "run_attention",
                        lambda *a, **kw: ours.append(a[3]) or a[5].fill_(2.0))
    md = backend_gpu.FluxGPUMetadata(4, 3, 10, None, None, None, None,
                                     step=None if dense else object(), flash="flash-md")
    out = torch.zeros(4, 2, 8)
    q = torch.randn(4, 2, 8)
    impl.forward(None, q, q, q, torch.zeros(1), md, out)
    if dense:
        assert impl.flash.calls == [("forward", "flash-md")] and not ours
        assert bool((out == 1.0).all())
    else:
        assert impl.flash.calls == [] and ours == [md]
        assert bool((out == 2.0).all())
    impl.do_kv_cache_update(None, q, q, torch.zeros(1), torch.arange(4))
    assert impl.flash.calls[-1] == ("kv", 4)


def test_profiling_runs_touch_nothing():
    impl = object.__new__(backend_gpu.FluxGPUAttentionImpl)
    impl.flash = _Recorder()
    out = torch.zeros(2)
    assert impl.forward(None, out, out, out, out, None, out) is out
    assert impl.flash.calls == []


@pytest.mark.parametrize("version", [None, 2, 3, 4])
def test_flash_varlen_registered_for_fa2_and_fa3(monkeypatch, version):
    """The backend hands vLLM's FlashAttention varlen function, bound to the version vLLM chose,
    to our kernels for FlashAttention 2 and 3 (the window, paged and log-sum-exp contract
    ``kernels.flash_varlen`` uses); for other versions nothing is registered."""
    from vllm.v1.attention.backends import fa_utils

    from attention_backends.kernels import flash_varlen

    seen = []
    monkeypatch.setattr(fa_utils, "flash_attn_varlen_func",
                        lambda **kw: seen.append(kw["fa_version"]), raising=False)
    flash_varlen.register(None)
    try:
        backend_gpu.register_flash_varlen(version)
        fn = flash_varlen.registered()
        if version in (2, 3):
            fn(q=None)
            assert seen == [version]
        else:
            assert fn is None
    finally:
        flash_varlen.register(None)


def _config(eager=False, mode="FULL_AND_PIECEWISE", spec=None, extra=None, max_seqs=256,
            max_capture=512, backend="CUSTOM"):
    from vllm.config import CUDAGraphMode
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return SimpleNamespace(
        attention_config=SimpleNamespace(backend=AttentionBackendEnum[backend]),
        additional_config=extra or {}, speculative_config=spec,
        compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode[mode],
                                           max_cudagraph_capture_size=max_capture),
        model_config=SimpleNamespace(enforce_eager=eager, dtype=torch.bfloat16,
                                     get_num_attention_heads=lambda pc: 4),
        scheduler_config=SimpleNamespace(max_num_seqs=max_seqs), parallel_config=None)


@pytest.mark.parametrize(("kw", "rows"), [
    ({}, 64),
    ({"max_seqs": 16}, 16),
    ({"max_capture": 8}, 8),
    ({"eager": True}, None),
    ({"mode": "PIECEWISE"}, None),
    ({"mode": "NONE"}, None),
    ({"spec": object()}, None),
    ({"extra": {backend_gpu.FULL_GRAPHS_KEY: False}}, None),
    ({"backend": "FLASH_ATTN"}, None),  # not ours
])
def test_our_full_graphs_where_vllm_captures_full_decode_graphs(kw, rows):
    spec = SimpleNamespace(head_size=16)
    gi = backend_gpu._graph_inputs_for(_config(**kw), spec, 2, "cpu")
    assert backend_gpu.our_graph_rows(_config(**kw)) == (rows or 0)
    if rows is None:
        assert gi is None
    else:
        assert gi.max_rows == rows and gi.q_ref.shape == (2, rows, 4, 16)
        assert gi.q_ref.dtype == torch.bfloat16


def test_a_step_on_our_full_graph_writes_the_buffers(monkeypatch):
    from attention_backends.vllm_glue import graph_inputs

    gi = graph_inputs.GraphInputs(4, 8, 2, 8, torch.float32, "cpu")
    written = []
    monkeypatch.setattr(gi, "write_step", lambda step, n, rt: written.append((step, n)))
    monkeypatch.setattr(backend_gpu, "step_metadata_for", lambda cm, cfg, **kw: None)
    b = _builder()
    b.graph = gi
    metadata.note_graph(metadata.OUR_FULL)
    try:
        md = b.build(0, _cm())
    finally:
        metadata.note_graph(None)
    assert md.graph is gi and md.flash is None and written == [(None, 2)]
    assert b.flash.calls == []  # no FlashAttention metadata for our graph
    impl = object.__new__(backend_gpu.FluxGPUAttentionImpl)
    impl.flash, impl.scale = _Recorder(), 0.125
    ran = []
    monkeypatch.setattr(backend_gpu, "attend_graph", lambda *a: ran.append(a[3]) or a[5])
    out = torch.zeros(4, 2, 8)
    impl.forward(None, out, out, out, torch.zeros(1), md, out)
    assert ran == [md] and impl.flash.calls == []
