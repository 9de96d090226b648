"""CPU attention backend: vLLM's CPU attention, plus Flux routing and KV eviction where asked.

Registered over ``CPU_ATTN`` (the CPU platform always picks that name). vLLM's own op writes
every K/V, in vLLM's ISA-specific layout (``do_kv_cache_update`` is vLLM's). Each step:

- **No row asks for anything but full attention** (no sparse layer, no request to route, no
  eviction plan): the builder returns vLLM's own metadata and the step is exactly vLLM's CPU
  path (vLLM's metadata, vLLM's kernel); ``forward`` hands it straight to vLLM's.
- **Otherwise**, per layer (``RowSplit``), each row goes one of three ways:
  - plain causal attention (full attention, or sparse but no longer than ``sink + window``):
    vLLM's kernel, as a sub-batch whose scheduler metadata vLLM's builder makes;
  - sparse with a sink of whole blocks and a window of at least one block (the defaults):
    vLLM's kernel too, with its sliding window over virtual block tables
    (``kernels.sink_window``), so that its cost stops growing with the context;
  - compressed rows (KV eviction) decoding one token, at layers where they are not sparse:
    vLLM's kernel on the whole blocks they see, the few slots around the gap (and CaliDrop's
    evicted part) merged in through the kernel's sink logit (``kernels.compressed_decode``);
  - other compressed rows, and sparse rows with other sinks or windows:
    ``ops.paged_attention`` (``kernels.cpu_paged``).
  Our float32 parts read vLLM's layout through the ``KVLayout`` that ``kv_layout.probe`` finds
  by writing coded values through vLLM's own writer.
  Then the rows whose prompt completes in this step are compressed
  (``attention.compress_completed``), in the same layout.

The per-step metadata (``StepMetadata``) is the GPU backend's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from vllm import _custom_ops as vllm_ops
from vllm import envs
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from attention_backends.kernels import compressed_decode, kv_layout, sink_window
from attention_backends.kernels.cpu_paged import calibration_hits
from attention_backends.kernels.kv_layout import KVLayout
from attention_backends.vllm_glue.attention import (
    attend,
    compress_completed,
    layer_index,
    token_index,
)
from attention_backends.vllm_glue.metadata import StepMetadata, num_layers, step_metadata_for
from kv_policies.eviction.runtime import get_runtime

_ONE_QUERY = torch.tensor([0, 1], dtype=torch.int32)


class RowSplit:
    """How each row of a step attends at a layer, and the kernel inputs of each group.

    A row is **dense** at layer ``l`` (vLLM's kernel, real block table) unless it was
    compressed by an earlier step, or runs sparse attention at ``l`` and some query of the step
    cannot see every key (its sequence is longer than ``sink + window``). Such a sparse row is
    **windowed** (vLLM's kernel over a ``SinkWindowPlan``) when ``sink_window.can_plan`` takes
    it. A compressed row with one query that is not sparse at ``l`` is **compressed** (vLLM's
    kernel on its bulk, ``compressed_decode``); the others are **masked**
    (``ops.paged_attention``). Kernel inputs are built once per distinct set of rows in a step.
    """

    def __init__(self, step: StepMetadata, cm: CommonAttentionMetadata,
                 builder: CPUAttentionMetadataBuilder) -> None:
        self.step = step
        self._cm = cm
        self._builder = builder
        routing, n = step.routing, cm.num_reqs
        self.seq_lens: list[int] = cm.seq_lens.tolist()
        self._sink, self._window = routing.sink.tolist(), routing.window.tolist()
        ev = step.eviction
        self._kept_end = ev.kept_end.tolist() if ev.kept_end is not None else [0] * n
        self._gap_end = ev.gap_end.tolist() if ev.gap_end is not None else [0] * n
        self._compressed = [k > 0 for k in self._kept_end]
        bs = builder.block_size
        self._plannable = [sink_window.can_plan(s, w, bs)
                           for s, w in zip(self._sink, self._window, strict=True)]
        qsl = step.query_start_loc
        self._one_query = [qsl[r + 1] - qsl[r] == 1 for r in range(n)]
        self._dense: dict[tuple[int, ...], tuple[CPUAttentionMetadata, torch.Tensor]] = {}
        self._windowed: dict[tuple[int, ...], list] = {}
        self._plans: dict[int, tuple] = {}

    def rows_at(self, layer: int) -> tuple[list[int], list[int], list[int], list[int]]:
        """``(dense, windowed, compressed, masked)`` rows at ``layer``, each ascending."""
        sparse = self.step.routing.sparse[layer].tolist()
        dense, windowed, compressed, masked = [], [], [], []
        for r, seq_len in enumerate(self.seq_lens):
            short = seq_len <= self._sink[r] + self._window[r]
            if self._compressed[r]:
                (compressed if self._one_query[r] and (not sparse[r] or short)
                 else masked).append(r)
            elif not sparse[r] or short:
                dense.append(r)
            elif self._plannable[r]:
                windowed.append(r)
            else:
                masked.append(r)
        return dense, windowed, compressed, masked

    def compressed_plan(self, row: int, impl: CPUAttentionBackendImpl, isa: str,
                        dtype: torch.dtype) -> tuple:
        """``(plan, bulk block table [1, n] int32, bulk length [1] int32, kernel scheduler
        metadata)`` of a compressed decode row (``compressed_decode.plan_compressed_decode``;
        the last three None without a bulk), for the kernel with its heads duplicated."""
        hit = self._plans.get(row)
        if hit is not None:
            return hit
        plan = compressed_decode.plan_compressed_decode(
            self.seq_lens[row], self._kept_end[row], self._gap_end[row],
            self._builder.block_size)
        row_blocks = self._cm.block_table_tensor[row]
        table = md = lens = None
        if plan.bulk_len:
            lens = torch.tensor([plan.bulk_len], dtype=torch.int32)
            logical = torch.tensor(plan.bulk_blocks, dtype=torch.int64)
            table = row_blocks.index_select(0, logical)[None]
            table = table.to(torch.int32).contiguous()
            md = vllm_ops.cpu_attn_get_scheduler_metadata(
                num_reqs=1, num_heads=2 * impl.num_heads, num_kv_heads=impl.num_kv_heads,
                head_dim=impl.head_size, seq_lens=lens,
                dtype=dtype, query_start_loc=_ONE_QUERY, causal=True, sliding_window_size=-1,
                isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                kv_cache_dtype=impl.kv_cache_dtype)
        hit = (plan, table, lens, md)
        self._plans[row] = hit
        return hit

    def dense(self, rows: list[int]) -> tuple[CPUAttentionMetadata, torch.Tensor]:
        """vLLM's metadata for the sub-batch of ``rows`` and its tokens' positions in the batch
        (int64)."""
        key = tuple(rows)
        hit = self._dense.get(key)
        if hit is not None:
            return hit
        cm = self._cm
        qsl = self.step.query_start_loc
        tokens = token_index(qsl, rows)
        q_lens = [qsl[r + 1] - qsl[r] for r in rows]
        sub_qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        sel = torch.tensor(rows, dtype=torch.int64)
        # The CPU builder reads only the fields replaced here.
        sub = cm.replace(
            query_start_loc=sub_qsl, query_start_loc_cpu=sub_qsl, seq_lens=cm.seq_lens[sel],
            num_reqs=len(rows), num_actual_tokens=int(tokens.numel()),
            max_query_len=max(q_lens), max_seq_len=max(self.seq_lens[r] for r in rows),
            block_table_tensor=cm.block_table_tensor[sel], slot_mapping=cm.slot_mapping[tokens],
            _num_computed_tokens_cache=None, _token_to_req_indices_cache=None)
        hit = (CPUAttentionMetadataBuilder.build(self._builder, 0, sub), tokens)
        self._dense[key] = hit
        return hit

    def windowed(self, rows: list[int], impl: CPUAttentionBackendImpl, isa: str,
                 dtype: torch.dtype) -> list[tuple[sink_window.SinkWindowPlan, torch.Tensor]]:
        """The ``SinkWindowPlan``s of ``rows``, each with vLLM's scheduler metadata for it."""
        key = tuple(rows)
        hit = self._windowed.get(key)
        if hit is not None:
            return hit
        plans = sink_window.plan_sink_window(
            rows, self.step.query_start_loc, self.seq_lens, self._sink, self._window,
            self._cm.block_table_tensor, self._builder.block_size)
        hit = [(plan, vllm_ops.cpu_attn_get_scheduler_metadata(
            num_reqs=int(plan.seq_lens.shape[0]), num_heads=impl.num_heads,
            num_kv_heads=impl.num_kv_heads, head_dim=impl.head_size, seq_lens=plan.seq_lens,
            dtype=dtype, query_start_loc=plan.query_start_loc, causal=True,
            sliding_window_size=plan.sliding_window, isa=isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=impl.kv_cache_dtype))
            for plan in plans]
        self._windowed[key] = hit
        return hit


@dataclass
class FluxCPUMetadata(CPUAttentionMetadata):
    # None: no row needs anything but full attention (the step is vLLM's alone)
    step: StepMetadata | None = None
    split: RowSplit | None = None


class FluxCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.num_layers = num_layers(vllm_config)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> CPUAttentionMetadata | FluxCPUMetadata:
        """vLLM's metadata as it is when no row needs our attention, else with the step's
        ``StepMetadata`` and ``RowSplit``."""
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self.is_cross_attention or self.is_encoder_only_attention:
            return base
        step = step_metadata_for(common_attn_metadata, self.vllm_config, none_when_dense=True,
                                 layers=self.num_layers)
        if step is None:
            return base
        return FluxCPUMetadata(**{f.name: getattr(base, f.name) for f in fields(base)},
                               step=step, split=RowSplit(step, common_attn_metadata, self))


_LAYOUTS: dict[tuple, KVLayout] = {}
_SINKS_CHECKED: set[tuple] = set()


class FluxCPUAttentionImpl(CPUAttentionBackendImpl):
    def kv_layout(self, layer, kv_cache: torch.Tensor) -> KVLayout:
        """Where vLLM's CPU op puts K/V in this layer's blocks (probed once per ISA and shape)."""
        bs, d = kv_cache.shape[2], kv_cache.shape[3] // 2
        key = (getattr(layer, "isa", None), kv_cache.dtype, bs, d)
        layout = _LAYOUTS.get(key)
        if layout is None:
            def write(k, v, cache, slots):
                CPUAttentionBackendImpl.do_kv_cache_update(self, layer, k, v, cache, slots)

            layout = kv_layout.probe(f"vLLM CPU ({key[0]})", write, bs, d, kv_cache.dtype)
            _LAYOUTS[key] = layout
        return layout

    def check_sink_logit(self, isa: str, dtype: torch.dtype) -> None:
        """``compressed_decode.check_sink_logit`` on vLLM's kernel, once per ISA and dtype."""
        key = (isa, dtype, self.head_size)
        if key in _SINKS_CHECKED:
            return
        bs = 32

        def attend(q, k, v, s_aux):
            n, hkv, d = k.shape
            nb = -(-n // bs)
            cache = torch.zeros(nb, hkv, bs, 2 * d, dtype=dtype)
            kc, vc = cache.view(nb, hkv, 2 * bs, d).chunk(2, dim=2)
            vllm_ops.cpu_attn_reshape_and_cache(k, v, kc, vc, torch.arange(n), isa)
            lens = torch.tensor([n], dtype=torch.int32)
            md = vllm_ops.cpu_attn_get_scheduler_metadata(
                num_reqs=1, num_heads=q.shape[1], num_kv_heads=hkv, head_dim=d, seq_lens=lens,
                dtype=dtype, query_start_loc=_ONE_QUERY, causal=True, sliding_window_size=-1,
                isa=isa, enable_kv_split=False)
            out = torch.empty_like(q)
            vllm_ops.cpu_attention_with_kv_cache(
                query=q, key_cache=kc, value_cache=vc, output=out, query_start_loc=_ONE_QUERY,
                seq_lens=lens, scale=d ** -0.5, causal=True, alibi_slopes=None,
                sliding_window=-1, block_table=torch.arange(nb, dtype=torch.int32)[None],
                softcap=0.0, scheduler_metadata=md, s_aux=s_aux)
            return out

        compressed_decode.check_sink_logit(attend, self.head_size, dtype)
        _SINKS_CHECKED.add(key)

    def _check_supported(self) -> None:
        if self.alibi_slopes is not None or self.sliding_window > 0 or self.logits_soft_cap \
                or self.sinks is not None or self.is_fp8_kv_cache:
            raise NotImplementedError("fluxserve CPU backend: sparse attention and KV eviction "
                                      "need a model without alibi, sliding window, softcap or "
                                      "learned sinks, and a KV cache that is not fp8")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        md = attn_metadata
        if getattr(md, "step", None) is None or self.attn_type != AttentionType.DECODER:
            return super().forward(layer, query, key, value, kv_cache, md, output,
                                   output_scale, output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization")
        split: RowSplit = md.split
        dense, windowed, compressed, masked = split.rows_at(layer_index(layer))
        if not windowed and not compressed and not masked:
            super().forward(layer, query, key, value, kv_cache, md, output)
        elif dense:
            sub, tokens = split.dense(dense)
            sub_out = output.new_empty((tokens.numel(), *output.shape[1:]))
            super().forward(layer, query.index_select(0, tokens), key, value, kv_cache, sub,
                            sub_out)
            output.index_copy_(0, tokens, sub_out)
        if windowed or compressed or masked or md.step.eviction.compress_rows:
            self._check_supported()
        if windowed:
            self._windowed(layer, query, kv_cache, output,
                           split.windowed(windowed, self, layer.isa, query.dtype))
        layout = None
        if compressed or masked or md.step.eviction.compress_rows:
            layout = self.kv_layout(layer, kv_cache)
        if compressed:
            self._compressed_decode(layer, query, kv_cache, md, output, compressed, layout)
        if masked:
            attend(layer, query, kv_cache, md, self.scale, output, rows=masked, kv_layout=layout)
        compress_completed(layer, query, kv_cache, md, self.scale, kv_layout=layout)
        return output

    def _compressed_decode(self, layer, query, kv_cache, md, output, rows: list[int],
                           layout: KVLayout) -> None:
        """Compressed rows decoding one token (``kernels.compressed_decode``), one by one: the
        slots around the gap in float32 with their log-sum-exp, merged with CaliDrop's evicted
        part where it applies, then vLLM's kernel on the bulk with that as its sink logit."""
        self.check_sink_logit(layer.isa, query.dtype)
        split: RowSplit = md.split
        li = layer_index(layer)
        qsl = md.step.query_start_loc
        tokens = torch.tensor([qsl[r] for r in rows], dtype=torch.int64)
        q_rows = query.index_select(0, tokens)  # [R, Hq, D]
        rt = get_runtime()
        ids = md.step.routing.req_ids
        live = [ids[r] or "" for r in rows]
        calib = rt.calibration_for(li, live, query.device)
        hit = calibration_hits(q_rows, calib)
        if hit is not None:
            rt.record_hits(li, live, hit)
            calibrated = hit.any(-1).tolist()
        block_table = md.block_table
        nb, hkv, bs, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(nb, hkv, 2 * bs, -1).chunk(2, dim=2)
        result = torch.empty(q_rows.shape, dtype=torch.float32)
        for i, r in enumerate(rows):
            plan, table, lens, scheduler_metadata = split.compressed_plan(
                r, self, layer.isa, query.dtype)
            evicted = None
            if hit is not None and calibrated[i]:
                evicted = (calib.o_e[i].to(torch.float32), torch.where(
                    hit[i], calib.lse_e[i].to(torch.float32), float("-inf")))

            def bulk(q2, s_aux, table=table, lens=lens, scheduler_metadata=scheduler_metadata):
                out = q2.new_empty(q2.shape)
                vllm_ops.cpu_attention_with_kv_cache(
                    query=q2, key_cache=key_cache, value_cache=value_cache, output=out,
                    query_start_loc=_ONE_QUERY, seq_lens=lens, scale=self.scale, causal=True,
                    alibi_slopes=None, sliding_window=-1, block_table=table, softcap=0.0,
                    scheduler_metadata=scheduler_metadata, s_aux=s_aux)
                return out

            result[i] = compressed_decode.decode_row(
                q_rows[i], kv_cache, layout, block_table[r], plan, self.scale, evicted, bulk)
        output.index_copy_(0, tokens, result.to(output.dtype))

    def _windowed(self, layer, query, kv_cache, output, plans) -> None:
        """vLLM's kernel with its sliding window over each plan's virtual block tables."""
        nb, hkv, bs, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(nb, hkv, 2 * bs, -1).chunk(2, dim=2)
        for plan, scheduler_metadata in plans:
            out = output.new_empty((plan.tokens.numel(), *output.shape[1:]))
            vllm_ops.cpu_attention_with_kv_cache(
                query=query.index_select(0, plan.tokens), key_cache=key_cache,
                value_cache=value_cache, output=out, query_start_loc=plan.query_start_loc,
                seq_lens=plan.seq_lens, scale=self.scale, causal=True, alibi_slopes=None,
                sliding_window=plan.sliding_window, block_table=plan.block_table, softcap=0.0,
                scheduler_metadata=scheduler_metadata, s_aux=None)
            output.index_copy_(0, plan.tokens, out)


class FluxCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[FluxCPUAttentionImpl]:
        return FluxCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[FluxCPUMetadataBuilder]:
        return FluxCPUMetadataBuilder
