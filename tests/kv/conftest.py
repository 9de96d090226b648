"""One real vLLM (CPU) engine shared by the engine-level KV-policy tests.

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the tests can
read the scheduler's block pool and the worker's eviction state directly. The KV cache is sized
by block count: ``UNCOMPRESSED_FIT`` uncompressed long requests fill it exactly.
"""

from __future__ import annotations

import gc

import pytest

from tests.in_process_engine import in_process_llm

BLOCK_SIZE = 32  # vLLM's CPU attention needs a multiple of 32
LONG_PROMPT = 1024
LONG_MAX_TOKENS = 24
UNCOMPRESSED_FIT = 2  # N: long uncompressed requests the KV cache holds at once
BLOCKS_PER_LONG = -(-(LONG_PROMPT + LONG_MAX_TOKENS) // BLOCK_SIZE)
NUM_BLOCKS = UNCOMPRESSED_FIT * BLOCKS_PER_LONG + 1  # +1: vLLM's null block


@pytest.fixture(scope="session")
def llm(model_dir):
    engine = in_process_llm(model_dir, dtype="float32", enforce_eager=True,
                            block_size=BLOCK_SIZE, num_gpu_blocks_override=NUM_BLOCKS,
                            max_model_len=2048, max_num_seqs=64, max_num_batched_tokens=2048,
                            enable_prefix_caching=True, disable_log_stats=False, seed=0)
    yield engine
    del engine
    gc.collect()


@pytest.fixture(scope="session")
def scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler
