"""Running the Flux routers inside a vLLM model's forward, on the queries before RoPE.

A backend only sees queries after RoPE, so routing hooks the one place every supported model
hands its pre-RoPE queries over: ``self_attn.rotary_emb(positions, q, k)``. ``install_routing``
replaces each layer's ``rotary_emb`` with ``RoutedRotary``, which finds the step's metadata in
vLLM's forward context, lets ``flux.routing.route_layer`` route the step's pending requests for
that layer, and then applies the original rotary embedding unchanged. For Qwen3 the queries there
are already q-normed, as in the released Qwen3 Flux code.

Under torch.compile the hook is an opaque custom op (``torch.ops.fluxserve.flux_route``),
declared as mutating ``q`` so that it is kept and ordered; it never writes ``q``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attention_backends.flux.router import FluxRouter
from attention_backends.flux.routing import route_layer
from attention_backends.flux.step import RoutingStep


def _routing_step_for(attn_layer_name: str) -> RoutingStep | None:
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if isinstance(md, list):
        md = md[0] if md else None
    if isinstance(md, dict):
        md = md.get(attn_layer_name)
    step = getattr(md, "step", None)
    return step.routing if step is not None else None


def _route(q: Tensor, layer_idx: int, attn_layer_name: str, head_dim: int) -> None:
    route_layer(_routing_step_for(attn_layer_name), q, layer_idx, head_dim)


def _route_op_fake(q: Tensor, layer_idx: int, attn_layer_name: str, head_dim: int) -> None:
    return None


_OP_REGISTERED = False


def _ensure_op() -> None:
    global _OP_REGISTERED
    if _OP_REGISTERED:
        return
    if not hasattr(torch.ops, "fluxserve") or not hasattr(torch.ops.fluxserve, "flux_route"):
        from torch.library import Library
        from vllm.utils.torch_utils import direct_register_custom_op

        lib = Library("fluxserve", "FRAGMENT")
        _ensure_op.lib = lib  # keep the library (and the op) alive
        direct_register_custom_op("flux_route", _route, mutates_args=["q"],
                                  fake_impl=_route_op_fake, target_lib=lib)
    _OP_REGISTERED = True


class RoutedRotary(nn.Module):
    """Wraps a layer's rotary embedding: route on the pre-RoPE queries, then apply RoPE."""

    def __init__(self, inner: nn.Module, layer_idx: int, attn_layer_name: str,
                 head_dim: int) -> None:
        super().__init__()
        self.inner = inner
        self.layer_idx = layer_idx
        self.attn_layer_name = attn_layer_name
        self.head_dim = head_dim

    def forward(self, positions: Tensor, q: Tensor, k: Tensor, *args, **kwargs):
        if torch.compiler.is_compiling():
            torch.ops.fluxserve.flux_route(q, self.layer_idx, self.attn_layer_name,
                                           self.head_dim)
        else:
            _route(q, self.layer_idx, self.attn_layer_name, self.head_dim)
        return self.inner(positions, q, k, *args, **kwargs)

    def __getattr__(self, name: str):
        # Callers that read rotary attributes (head_size, cos_sin_cache, ...) see the original.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def install_routing(model: nn.Module) -> int:
    """Wrap every decoder layer's rotary embedding; returns the number of layers wrapped."""
    from vllm.model_executor.models.utils import extract_layer_index

    _ensure_op()
    n = 0
    for layer in decoder_layers(model):
        attn_mod = getattr(layer, "self_attn", None)
        if attn_mod is None or not hasattr(attn_mod, "rotary_emb"):
            continue
        if isinstance(attn_mod.rotary_emb, RoutedRotary):
            n += 1
            continue
        attn = attn_mod.attn
        idx = extract_layer_index(attn.layer_name)
        attn_mod.rotary_emb = RoutedRotary(attn_mod.rotary_emb, idx, attn.layer_name,
                                           attn_mod.head_dim)
        n += 1
    return n


def attach_routers(model: nn.Module, routers: dict[int, FluxRouter]) -> None:
    """Register routers as ``self_attn.mask_allocator`` (the checkpoints' module path)."""
    for i, layer in enumerate(decoder_layers(model)):
        attn_mod = getattr(layer, "self_attn", None)
        if attn_mod is not None and i in routers:
            attn_mod.mask_allocator = routers[i]
