"""Flux layer routing, independent of vLLM: per-request options, the router MLP and its files,
the per-request routing state, the routing part of each step's metadata, routing one layer,
the prefix-cache salt and the routing metrics.

Imports only ``attention_backends.kernels`` and libraries; the one vLLM use (the tensor-parallel
group in ``parallel``) is looked up lazily and optional. The vLLM glue is in
``attention_backends.vllm_glue``.
"""
