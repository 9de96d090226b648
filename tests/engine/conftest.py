"""One real vLLM (CPU) engine with small prefill chunks, shared by the engine-safety tests.

``max_num_batched_tokens=CHUNK`` makes every prompt longer than ``CHUNK`` tokens prefill in
several steps (chunked prefill), which is where per-request sampling state is rewound. The
engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that a worker error
surfaces as an exception in the test rather than a dead child process. Prefix caching is off so
that repeated prompts cost the same each time (the cost test compares timings).
"""

from __future__ import annotations

import gc

import pytest

from tests.in_process_engine import in_process_llm

CHUNK = 512  # tokens per engine step (prefill chunk)
MAX_MODEL_LEN = 2048


# package scope: the engine is shut down, and its worker state dropped, before the next test
# folder starts engines of its own in this process
@pytest.fixture(scope="package")
def llm(model_dir):
    engine = in_process_llm(model_dir, enforce_eager=True, max_model_len=MAX_MODEL_LEN,
                            max_num_seqs=16, max_num_batched_tokens=CHUNK,
                            enable_chunked_prefill=True, enable_prefix_caching=False, seed=0)
    yield engine
    del engine
    gc.collect()
    # The engine ran in this process: its last step's finished requests would be released at a
    # next step that never comes. Drop them, so that later in-process engines (tests/flux,
    # tests/kv) start with empty worker-side registries.
    from attention_backends.flux.request_state import get_registry
    from kv_policies.eviction.runtime import get_runtime

    registry = get_registry()
    for req_id in list(registry.states):
        registry.release(req_id)
    get_runtime().retain_only(())
