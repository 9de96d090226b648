"""vLLM's CPU attention cache, for tests that run vLLM's CPU kernel directly: the ISA vLLM picks
for a cache, and a writer in its layout (``kv_layout.probe``'s ``write`` contract)."""

from __future__ import annotations

import torch


def isa_for(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """The ISA vLLM's CPU backend picks for this cache (the key of its KV layout)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size)


def writer(isa: str):
    """``write(key, value, kv_cache [nb, Hkv, bs, 2 * D], slots)`` through vLLM's CPU op."""
    from vllm import _custom_ops as vllm_ops

    def write(k, v, cache, slots):
        nb, h, bs, d2 = cache.shape
        kc, vc = cache.view(nb, h, 2 * bs, d2 // 2).chunk(2, dim=2)
        vllm_ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)
    return write
