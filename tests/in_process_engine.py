"""A real vLLM (CPU) engine whose engine core runs in the test process, shared by the
engine-level test folders (tests/engine, tests/kv): a worker error surfaces as an exception in
the test, and a test can read the scheduler's and the worker's state directly."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from vllm import LLM


def in_process_llm(model_dir: str, **engine_args: Any) -> LLM:
    """``vllm.LLM(model=model_dir, scheduler_cls=<fluxserve's scheduler>, **engine_args)`` with
    the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and a 1 GiB KV cache
    unless ``VLLM_CPU_KVCACHE_SPACE`` is set; both variables are restored once it is built."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        from kv_policies.vllm_glue.engine import SCHEDULER_CLS

        return LLM(model=model_dir, scheduler_cls=SCHEDULER_CLS, **engine_args)
