"""The quality model: a Llama-architecture causal LM (GQA, RoPE with a large theta) built with
HF transformers and saved as a plain ``LlamaForCausalLM`` checkpoint that vLLM loads.

Presets (``PRESETS``): ``gpu`` (about 25 M parameters, trained for a few minutes on one H200)
and ``tiny`` (about 1 M parameters, for CPU CI). ``config.json`` is written by hand with the
classic Llama keys (``rope_theta``, ``torch_dtype``) so that every transformers version from
4.45 and vLLM read it alike; weights are bfloat16 safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from training.tokenizer import write_hf_tokenizer

PRESETS: dict[str, dict] = {
    "gpu": {"hidden_size": 512, "intermediate_size": 1280, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
            "rope_theta": 1_000_000.0, "max_position_embeddings": 32768,
            "tie_word_embeddings": True},
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
             "rope_theta": 100_000.0, "max_position_embeddings": 4096,
             "tie_word_embeddings": True},
}


def config_dict(preset: str, vocab_size: int, bos_id: int, eos_id: int) -> dict:
    """The checkpoint's ``config.json`` for a preset."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": vocab_size, **PRESETS[preset], "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "attention_bias": False, "mlp_bias": False,
            "initializer_range": 0.02, "torch_dtype": "bfloat16", "bos_token_id": bos_id,
            "eos_token_id": eos_id, "pad_token_id": eos_id}


def build_model(cfg: dict, seed: int):
    """A freshly initialised float32 ``LlamaForCausalLM`` (SDPA attention) for `cfg`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",
                                                                       "model_type",
                                                                       "torch_dtype")})
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).float()


def num_parameters(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def save_checkpoint(model, cfg: dict, out: Path, info: dict) -> None:
    """Write a vLLM-loadable checkpoint to `out`: config, generation config, tokenizer, bf16
    weights (``model.safetensors``, HF tensor names) and ``training_info.json`` (`info`)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    write_hf_tokenizer(out, cfg["max_position_embeddings"])
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
         "pad_token_id": cfg["pad_token_id"]}, indent=2) + "\n")
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous()
             for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), {"format": "pt"})
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")


def load_checkpoint(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a saved checkpoint as an HF ``LlamaForCausalLM`` (SDPA attention), in eval mode."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()
