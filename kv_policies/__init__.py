"""KV-cache eviction policies (none, streaming, snapkv, calidrop) for vLLM."""
