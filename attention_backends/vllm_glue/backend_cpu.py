"""CPU attention backend: vLLM's CPU backend with Flux routing and KV eviction.

Registered over ``CPU_ATTN`` (the CPU platform always picks that name). Decoder attention of
every row goes through ``ops.paged_attention`` (the float32 PyTorch reference on CPU; see
``vllm_glue.attention``), with per-(request, layer) full or sink + window attention, for prefill
chunks and decode alike. vLLM's own CPU kernels keep K/V in an ISA-specific layout that our
ops and the KV compaction cannot read, so this backend writes K/V in the shared layout
(``attention.write_kv``) and uses vLLM's kernels only for encoder/cross attention.
The per-step metadata (``StepMetadata``) is the GPU backend's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from attention_backends.vllm_glue.attention import run_attention, write_kv
from attention_backends.vllm_glue.metadata import StepMetadata, step_metadata_for


@dataclass
class FluxCPUMetadata(CPUAttentionMetadata):
    step: StepMetadata | None = None


class FluxCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> FluxCPUMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        step = None
        if not (self.is_cross_attention or self.is_encoder_only_attention):
            step = step_metadata_for(common_attn_metadata, self.vllm_config)
        return FluxCPUMetadata(**{f.name: getattr(base, f.name) for f in fields(base)}, step=step)


class FluxCPUAttentionImpl(CPUAttentionBackendImpl):
    def _ours(self) -> bool:
        return self.attn_type == AttentionType.DECODER

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if not self._ours():
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        write_kv(key, value, kv_cache, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if attn_metadata is None or not self._ours():
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization")
        if self.alibi_slopes is not None or self.sliding_window > 0 or self.logits_soft_cap \
                or self.sinks is not None or self.is_fp8_kv_cache:
            raise NotImplementedError("fluxserve CPU backend: no alibi, sliding-window, softcap,"
                                      " learned-sink or fp8-KV models")
        return run_attention(layer, query, kv_cache, attn_metadata, self.scale, output)


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
