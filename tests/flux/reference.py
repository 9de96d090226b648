"""Independent references for the Flux tests: HF transformers with per-layer masks, and a
functional router written from the checkpoint tensors (no code shared with the engine's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_STATE: dict = {}


def _flux_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention whose mask depends on the layer: causal, or causal sink + window."""
    layer = module.layer_idx
    sparse = _STATE["sparse"][layer]
    sink, window = _STATE["sink"], _STATE["window"]
    g = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(g, dim=1)
    v = value.repeat_interleave(g, dim=1)
    t, s = query.shape[2], k.shape[2]
    p = torch.arange(s - t, s)[:, None]
    j = torch.arange(s)[None, :]
    visible = j <= p
    if sparse:
        visible &= (j < sink) | (j > p - window)
    scores = (query.float() @ k.float().transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v.float()
    return out.transpose(1, 2).contiguous().to(query.dtype), None


def load_hf(model_dir: str):
    from transformers import AttentionInterface, LlamaForCausalLM

    AttentionInterface.register("flux_ref", _flux_attention)
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                             attn_implementation="flux_ref")
    return model.eval()


@torch.no_grad()
def hf_logprobs(model, tokens: list[int], sparse: list[bool], sink: int, window: int,
                capture_q: bool = False):
    """Log-softmax ``[len(tokens), vocab]`` under the given per-layer masks (and the pre-RoPE
    queries ``{layer: [T, H, D]}`` if asked)."""
    _STATE.update(sparse=list(sparse), sink=sink, window=window)
    qs: dict[int, torch.Tensor] = {}
    hooks = []
    if capture_q:
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn

            def hook(mod, inp, out, i=i, attn=attn):
                qs[i] = out[0].view(out.shape[1], -1, attn.head_dim).clone()

            hooks.append(attn.q_proj.register_forward_hook(hook))
    try:
        logits = model(torch.tensor([tokens])).logits[0].float()
    finally:
        for h in hooks:
            h.remove()
    return torch.log_softmax(logits, dim=-1), qs


def reference_router_sparse(tensors: dict[str, torch.Tensor], layer: int, q: torch.Tensor,
                            pool: int) -> tuple[bool, float]:
    """Decision of layer ``layer`` for queries ``q [n, H, D]`` -> (sparse?, logit margin).

    Written from the paper's description: mean over the first ``pool`` and the last ``pool``
    tokens (concatenated), mean over heads, two MLP stages with SiLU, argmax (1 = full).
    """
    pre = f"model.layers.{layer}.self_attn.mask_allocator."
    w = {k[len(pre):]: v.double() for k, v in tensors.items() if k.startswith(pre)}
    n = q.shape[0]
    p = min(pool, n)
    pooled = torch.cat([q[:p], q[n - p:]], dim=0).double().mean(dim=0).mean(dim=0)
    h = F.linear(pooled, w["cls_feat_extractor.0.weight"], w["cls_feat_extractor.0.bias"])
    h = F.linear(F.silu(h), w["cls_feat_extractor.2.weight"], w["cls_feat_extractor.2.bias"])
    for idx in (0, 2):
        h = F.linear(h, w[f"cls_router_head_agnostic.{idx}.weight"],
                     w[f"cls_router_head_agnostic.{idx}.bias"])
        h = F.silu(h)
    logits = F.linear(h, w["cls_router_head_agnostic.4.weight"],
                      w["cls_router_head_agnostic.4.bias"])
    return bool(logits[1] <= logits[0]), float((logits[1] - logits[0]).abs())
