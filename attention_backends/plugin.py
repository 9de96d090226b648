"""vLLM general plugin (entry point ``fluxserve``): runs in every vLLM process before models load.

``register()`` is idempotent and cheap (no model code is imported until vLLM resolves a name):

- overrides ``CPU_ATTN`` with our CPU backend (the CPU platform ignores --attention-backend);
- registers ``CUSTOM`` as our GPU backend (select it with ``--attention-backend CUSTOM``);
- registers the Flux checkpoint architectures ``PawLlamaForCausalLM`` / ``PawQwen3ForCausalLM``;
- wraps three V1 model-runner methods (``runner_hooks``) to feed per-request routing state;
- calls the KV-policy package's registration hook.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

CPU_BACKEND = "attention_backends.backend.FluxCPUAttentionBackend"
GPU_BACKEND = "attention_backends.backend_gpu.FluxGPUAttentionBackend"
MODELS = {
    "PawLlamaForCausalLM": "attention_backends.flux_models:PawLlamaForCausalLM",
    "PawQwen3ForCausalLM": "attention_backends.flux_models:PawQwen3ForCausalLM",
}

_DONE = False


def register() -> None:
    global _DONE
    if _DONE:
        return
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
    register_backend(AttentionBackendEnum.CUSTOM, GPU_BACKEND)
    for arch, path in MODELS.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, path)

    from attention_backends import runner_hooks

    runner_hooks.install()

    try:
        from kv_policies import engine as kv_engine
    except ImportError:  # the KV-policy package is optional for Flux
        kv_engine = None
    if kv_engine is not None and hasattr(kv_engine, "register"):
        kv_engine.register()
    _DONE = True
    _record_load()


def _record_load() -> None:
    # Evidence of where the plugin ran (vLLM names its processes, e.g. EngineCore, VllmWorker-0).
    import multiprocessing

    from attention_backends.metrics import PLUGIN_LOADS

    PLUGIN_LOADS.labels(multiprocessing.current_process().name).inc()
