"""KV eviction without vLLM: per-request options, the policy interface and registry, the built-in
policies, the eviction plan, the worker runtime (selection, calibration, compaction) and the
eviction part of each step's metadata. Imports only ``attention_backends.kernels``."""
