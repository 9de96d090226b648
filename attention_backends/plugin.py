"""vLLM general plugin (entry point ``fluxserve``): runs in every vLLM process before models load.

``register()`` is idempotent and cheap (no model code is imported until vLLM resolves a name).
Public vLLM extension points:

- overrides ``CPU_ATTN`` with our CPU backend (the CPU platform ignores --attention-backend);
- registers ``CUSTOM`` as our GPU backend (select it with ``--attention-backend CUSTOM``);
- registers the Flux checkpoint architectures (``flux.router.PAW_ARCHITECTURES``) with
  ``ModelRegistry``.

Private ones, all in ``vllm_glue.vllm_private``: it checks them against the installed vLLM and
installs the model-runner and input-processor hooks (see that module and the README).
"""

from __future__ import annotations

import logging

from prometheus_client import Counter

from attention_backends.flux.router import PAW_ARCHITECTURES

logger = logging.getLogger(__name__)

CPU_BACKEND = "attention_backends.vllm_glue.backend_cpu.FluxCPUAttentionBackend"
GPU_BACKEND = "attention_backends.vllm_glue.backend_gpu.FluxGPUAttentionBackend"
MODELS = {arch: f"attention_backends.vllm_glue.models:{arch}" for arch in PAW_ARCHITECTURES}

PLUGIN_LOADS = Counter(
    "fluxserve:plugin_loads",
    "Times the fluxserve vLLM plugin registered itself, by process (API, engine core, worker).",
    ["process"],
)

_DONE = False


def register() -> None:
    global _DONE
    if _DONE:
        return
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from attention_backends.vllm_glue import vllm_private

    register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
    register_backend(AttentionBackendEnum.CUSTOM, GPU_BACKEND)
    for arch, path in MODELS.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, path)
    vllm_private.install()
    _DONE = True
    _record_load()


def _record_load() -> None:
    # Evidence of where the plugin ran (vLLM names its processes, e.g. EngineCore, VllmWorker-0).
    import multiprocessing

    PLUGIN_LOADS.labels(multiprocessing.current_process().name).inc()
