"""The vLLM glue of Flux routing and KV eviction: the attention backends (CPU, GPU), the step
metadata they build (``metadata``, composed from the Flux routing part and the KV-policy eviction
part), the shared attention step (``attention``), the Flux checkpoint models, the routing hooks
on a model's rotary embeddings, and every private vLLM hook in one module (``vllm_private``).

The plugin entry point (``attention_backends.plugin``) registers all of it.
"""
