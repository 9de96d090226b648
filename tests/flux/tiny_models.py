"""Tiny random checkpoints for the Flux tests (no tokenizer: tests pass token ids).

- ``make_llama(dir)``: a 4-layer Llama (hidden 256, 4 heads, 2 KV heads, vocab 2048), float32.
- ``make_paw(dir, base)``: the same weights as a released-format Flux checkpoint:
  ``architectures: ["PawLlamaForCausalLM"]``, the config keys ``sink_size``,
  ``local_window_size``, ``pool_size``, ``use_softmax``, ``pooling_mode`` and random routers under
  ``model.layers.{i}.self_attn.mask_allocator.*`` (the authors' parameter names).
- ``make_router(dir, paw)``: the Paw checkpoint's routers as a standalone router directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

NUM_LAYERS, HIDDEN, HEADS, KV_HEADS, VOCAB = 4, 256, 4, 2, 2048
HEAD_DIM = HIDDEN // HEADS
POOL, SINK, WINDOW = 16, 8, 32  # small so that 200-token prompts are "long"


def make_llama(d: str | Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    d = Path(d)
    if (d / "config.json").exists():
        return d
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512,
                      num_hidden_layers=NUM_LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, max_position_embeddings=4096,
                      torch_dtype="float32", tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, initializer_range=0.08)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(d, safe_serialization=True)
    return d


def router_tensors(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random router weights, authors' names; scaled so that decisions have clear margins."""
    g = torch.Generator().manual_seed(seed)
    d = HEAD_DIM
    shapes = {
        "cls_feat_extractor.0": (8 * d, d), "cls_feat_extractor.2": (2 * d, 8 * d),
        "cls_router_head_agnostic.0": (4 * d, 2 * d), "cls_router_head_agnostic.2": (d, 4 * d),
        "cls_router_head_agnostic.4": (2, d),
    }
    out = {}
    for i in range(NUM_LAYERS):
        for name, (o, n_in) in shapes.items():
            pre = f"model.layers.{i}.self_attn.mask_allocator.{name}"
            out[f"{pre}.weight"] = torch.randn(o, n_in, generator=g) * (3.0 / n_in ** 0.5)
            out[f"{pre}.bias"] = torch.randn(o, generator=g) * 0.1
    return out


def make_paw(d: str | Path, base: str | Path, seed: int = 1) -> Path:
    d, base = Path(d), Path(base)
    if (d / "config.json").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = ["PawLlamaForCausalLM"]
    cfg.update(sink_size=SINK, local_window_size=WINDOW, pool_size=POOL, use_softmax=True,
               pooling_mode="ctx_q", toggle_type="streaming", retrieval_mode="full")
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    weights = load_file(str(base / "model.safetensors"))
    weights.update(router_tensors(seed))
    # A training-only tensor of the authors' router, which serving must ignore.
    weights["model.layers.0.self_attn.mask_allocator.log_temp"] = torch.zeros(())
    save_file(weights, str(d / "model.safetensors"))
    if (base / "generation_config.json").exists():
        (d / "generation_config.json").write_text((base / "generation_config.json").read_text())
    return d


def make_router(d: str | Path, seed: int = 1) -> Path:
    """Standalone router (short names) with the same weights as ``make_paw``'s."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    t = {k.replace("model.layers.", "layers.").replace(".self_attn.mask_allocator", ""): v
         for k, v in router_tensors(seed).items()}
    save_file(t, str(d / "router.safetensors"))
    (d / "router_config.json").write_text(json.dumps({
        "num_hidden_layers": NUM_LAYERS, "head_dim": HEAD_DIM, "pool_size": POOL,
        "sink_size": SINK, "local_window_size": WINDOW, "use_softmax": True}))
    return d
