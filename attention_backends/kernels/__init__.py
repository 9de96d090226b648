"""Triton kernels (imported lazily by attention_backends.ops)."""
