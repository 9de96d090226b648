"""KV-cache eviction policies (none, streaming, snapkv, calidrop) for vLLM.

``kv_policies.eviction``: the policies, the eviction plan, the worker runtime and the eviction
part of each step's metadata (no vLLM import). ``kv_policies.vllm_glue``: the scheduler and
KV-cache manager subclasses that free evicted blocks in vLLM's engine core.
"""
