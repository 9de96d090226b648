"""Released Flux checkpoints in vLLM: one class per name of ``flux.router.PAW_ARCHITECTURES``.

They are vLLM's Llama / Qwen3 with one addition per layer, the router under
``self_attn.mask_allocator`` (so the checkpoint's router tensors load by name), and routing
installed on the pre-RoPE queries. The checkpoint's config keys ``pool_size``, ``sink_size``
and ``local_window_size`` (and ``use_softmax``) set the routing defaults.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from attention_backends.flux.request_state import get_registry
from attention_backends.flux.router import FluxRouter, RouterSpec
from attention_backends.vllm_glue.routing_hooks import (
    attach_routers,
    decoder_layers,
    install_routing,
)


class _PawMixin:
    def _init_flux(self) -> None:
        cfg = self.config
        spec = RouterSpec.from_config(cfg)
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        routers = {i: FluxRouter(head_dim, spec.num_outputs)
                   for i, _ in enumerate(decoder_layers(self))}
        attach_routers(self, routers)
        install_routing(self)
        get_registry().set_routers(routers, spec)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The routers' parameters are float32 modules inside self_attn: the stock loader finds
        # them by name. Training-only router tensors (task_embedding, log_temp) are dropped.
        keep = ((n, w) for n, w in weights
                if ".mask_allocator." not in n
                or ".cls_feat_extractor." in n or ".cls_router_head_agnostic." in n)
        loaded = super().load_weights(keep)  # type: ignore[misc]
        for r in get_registry().routers.values():
            r.eval()
        return loaded


class PawLlamaForCausalLM(_PawMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._init_flux()


class PawQwen3ForCausalLM(_PawMixin, Qwen3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._init_flux()
