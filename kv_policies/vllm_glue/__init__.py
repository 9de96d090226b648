"""vLLM engine-core glue of KV eviction: ``KVPolicyScheduler`` (``--scheduler-cls``) hands each
request's eviction plan to ``KVPolicyManager`` (registered with ``register_kv_cache_spec``),
which frees the evicted blocks. See ``engine`` for how the pieces fit together."""
