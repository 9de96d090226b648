"""GPU attention backend (``--attention-backend CUSTOM``).

KV layout: vLLM's FlashAttention layout, ``[num_blocks, num_kv_heads, block_size,
2 * head_size]`` (K then V on the last dim), written by vLLM's own cache op on the slot mapping.

Two paths, chosen per step:

- **dense steps** (no row with a sparse layer or a KV-eviction plan: ``StepMetadata`` is None,
  which is every step of requests without options): vLLM's own FlashAttention
  (``FlashAttentionImpl`` and its metadata builder, composed here), so such requests cost what
  they cost on stock vLLM, full CUDA graphs for uniform decode batches included;
- **steps with Flux or KV-policy rows**: ``ops.paged_attention`` for the whole batch, with
  per-row ``sink``/``window`` for the layer (``window = 0`` on full rows) and per-row eviction
  bounds, so rows of every mode run in one launch: our Triton kernels, or vLLM's FlashAttention
  varlen function (registered here) where the tuned table says it is faster
  (``kernels.flash_varlen``: dense layers, sink + window layers whose rows share one window).
  These steps never replay one of vLLM's FULL CUDA graphs (captured with FlashAttention).
  A uniform decode batch of at most ``graph_inputs.MAX_GRAPH_ROWS`` rows replays ours: a FULL
  graph of the same size captured with our decode kernel, which reads the step's masks, gap
  bounds and calibration from persistent buffers (``graph_inputs``; turned off with
  ``additional_config={"flux_full_cuda_graphs": false}``). Other such steps run our attention
  eagerly between piecewise graphs, and a step that routes ``auto`` requests runs without
  graphs, since its router runs Python inside the graph pieces (the model runner hook,
  ``vllm_private``).

Needs vLLM's V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0``): the hooks wrap it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from attention_backends.kernels import flash_varlen
from attention_backends.vllm_glue import graph_inputs
from attention_backends.vllm_glue.attention import attend_graph, run_attention
from attention_backends.vllm_glue.metadata import (
    OUR_FULL,
    StepMetadata,
    check_graph_mode,
    graph_kind,
    num_layers,
    step_metadata_for,
)
from kv_policies.eviction.runtime import get_runtime

# ``additional_config`` key: False turns our FULL CUDA graphs off (decode steps with Flux or
# KV-policy rows then run our attention eagerly between piecewise graphs)
FULL_GRAPHS_KEY = "flux_full_cuda_graphs"


@dataclass
class FluxGPUMetadata:
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    step: StepMetadata | None
    # host copies for the dense-prefill dispatch (no device sync); seq lengths exact on prefill
    # rows, None under speculative decoding (decode rows with long queries are only bounds)
    query_start_loc_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    # dense steps (``step`` None): vLLM's FlashAttention metadata, which runs the step
    flash: object | None = None
    # steps replaying (or capturing) our FULL graph: the buffers the captured call reads
    graph: graph_inputs.GraphInputs | None = None


def our_graph_rows(vllm_config) -> int:
    """The largest decode batch that replays our FULL CUDA graphs under this engine config: 0
    where there are none (another attention backend than ours; eager engines, piecewise-only
    graphs, speculative decoding with its decode batches of several tokens a row, or
    ``additional_config`` turning them off), else the least of ``graph_inputs.MAX_GRAPH_ROWS``,
    ``max_num_seqs`` and vLLM's largest capture size."""
    extra = vllm_config.additional_config
    if isinstance(extra, dict) and not extra.get(FULL_GRAPHS_KEY, True):
        return 0
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    if getattr(backend, "name", backend) != "CUSTOM":
        return 0
    cc = vllm_config.compilation_config
    mode = cc.cudagraph_mode
    if (vllm_config.model_config.enforce_eager or mode is None
            or getattr(mode.decode_mode(), "name", None) != "FULL"
            or vllm_config.speculative_config is not None):
        return 0
    return max(0, min(graph_inputs.MAX_GRAPH_ROWS, vllm_config.scheduler_config.max_num_seqs,
                      cc.max_cudagraph_capture_size or 0))


def _graph_inputs_for(vllm_config, kv_cache_spec, layers: int,
                      device) -> graph_inputs.GraphInputs | None:
    """The buffers of our FULL graphs (``our_graph_rows`` rows), or None where there are none."""
    rows = our_graph_rows(vllm_config)
    if not rows:
        return None
    hq = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
    return graph_inputs.GraphInputs(layers, rows, hq, kv_cache_spec.head_size,
                                    vllm_config.model_config.dtype, device)


class FluxGPUMetadataBuilder(AttentionMetadataBuilder[FluxGPUMetadata]):
    # Full graphs for uniform decode batches, as FlashAttention with FA2 declares: only dense
    # steps replay them (the runner hook keeps every other step off FULL).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

        self.vllm_config = vllm_config
        self.num_layers = num_layers(vllm_config)
        self.flash = FlashAttentionMetadataBuilder(kv_cache_spec, layer_names, vllm_config,
                                                   device)
        self.graph = _graph_inputs_for(vllm_config, kv_cache_spec, self.num_layers, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> FluxGPUMetadata:
        cm = common_attn_metadata
        step = step_metadata_for(cm, self.vllm_config, none_when_dense=True,
                                 layers=self.num_layers)
        check_graph_mode(step)
        if graph_kind() == OUR_FULL and self.graph is not None:
            # our FULL graph (or its warm-up and capture, with no rows: step None): the step's
            # values go to the buffers the captured call reads
            self.graph.write_step(step, cm.num_reqs, get_runtime())
            return FluxGPUMetadata(
                num_actual_tokens=cm.num_actual_tokens, max_query_len=cm.max_query_len,
                max_seq_len=cm.max_seq_len, query_start_loc=cm.query_start_loc,
                seq_lens=cm.seq_lens, block_table=cm.block_table_tensor,
                slot_mapping=cm.slot_mapping, step=step, graph=self.graph)
        if step is None:
            return FluxGPUMetadata(
                num_actual_tokens=cm.num_actual_tokens, max_query_len=cm.max_query_len,
                max_seq_len=cm.max_seq_len, query_start_loc=cm.query_start_loc,
                seq_lens=cm.seq_lens, block_table=cm.block_table_tensor,
                slot_mapping=cm.slot_mapping, step=None,
                flash=self.flash.build(common_prefix_len, cm, fast_build))
        seq_cpu = getattr(cm, "seq_lens_cpu_upper_bound", None)
        if seq_cpu is not None and self.vllm_config.speculative_config is None:
            seq_cpu = seq_cpu[:cm.num_reqs].tolist()
        else:
            seq_cpu = None
        return FluxGPUMetadata(
            num_actual_tokens=cm.num_actual_tokens, max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len, query_start_loc=cm.query_start_loc,
            seq_lens=cm.seq_lens, block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping, step=step,
            query_start_loc_cpu=cm.query_start_loc_cpu[:cm.num_reqs + 1].tolist(),
            seq_lens_cpu=seq_cpu,
        )


def register_flash_varlen(version: int | None) -> None:
    """Hand vLLM's FlashAttention varlen function (version 2 or 3: FlashAttention-3 on Hopper)
    to our kernels (``kernels.flash_varlen``), which dispatch to it where the tuned table says
    it is faster (dense layers, sink + window layers with one window)."""
    if version not in (2, 3):
        return
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

    flash_varlen.register(functools.partial(flash_attn_varlen_func, fa_version=version))


class FluxGPUAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes=None, sliding_window=None, kv_cache_dtype: str = "auto",
                 logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, **kwargs) -> None:
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap:
            raise NotImplementedError("CUSTOM (fluxserve) backend: no alibi/sliding window/"
                                      "softcap models")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError("CUSTOM (fluxserve) backend: decoder attention only")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

        self.flash = FlashAttentionImpl(num_heads, head_size, scale, num_kv_heads, None, None,
                                        kv_cache_dtype, None, attn_type,
                                        kv_sharing_target_layer_name)
        register_flash_varlen(getattr(self.flash, "vllm_flash_attn_version", None))

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        # vLLM's own cache write (same layout): what stock vLLM runs, graph-safe
        self.flash.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization")
        if attn_metadata is None:  # profiling run
            return output
        if attn_metadata.graph is not None:  # our FULL graph: every row, every option on
            return attend_graph(layer, query, kv_cache, attn_metadata, self.scale, output)
        if attn_metadata.step is None:  # a dense step: stock vLLM's attention
            return self.flash.forward(layer, query, key, value, kv_cache, attn_metadata.flash,
                                      output)
        return run_attention(layer, query, kv_cache, attn_metadata, self.scale, output,
                             key=key, value=value)


class FluxGPUAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16,
                                                      torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[FluxGPUAttentionImpl]:
        return FluxGPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[FluxGPUMetadataBuilder]:
        return FluxGPUMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [64, 80, 96, 128, 256]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)
