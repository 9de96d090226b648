"""Keeping vLLM's prefix cache correct under Flux routing.

A layer running sparse attention produces different hidden states, hence different K/V in every
later layer: a prompt's cached blocks are only reusable by a request that routes its layers the
same way. vLLM keys cached blocks by the request's ``cache_salt``, so each request gets a salt
derived from its flux options:

- ``full`` (or no flux options): unchanged, so it shares blocks with stock vLLM requests;
- ``sparse`` / ``layers``: the canonical options, so identical configurations share blocks;
- ``auto``: the request id (no sharing), since its decisions depend on its own prompt.

The vLLM glue (``vllm_glue.vllm_private``) wraps ``InputProcessor.process_inputs``, where the
API process builds every engine request, to add the salt (``request_cache_salt``); a caller's own
``cache_salt`` is kept as a prefix.
"""

from __future__ import annotations

import json

from attention_backends.flux.options import EXTRA_ARGS_KEY


def flux_cache_salt(flux: dict | None, request_id: str) -> str | None:
    if not flux or flux.get("mode", "full") == "full":
        return None
    mode = flux["mode"]
    if mode == "auto":
        return f"fluxserve:auto:{request_id}"
    key = {"mode": mode, "sparse_layers": sorted(flux.get("sparse_layers") or []),
           "sink": flux.get("sink"), "window": flux.get("window")}
    return "fluxserve:" + json.dumps(key, sort_keys=True, separators=(",", ":"))


def salted(existing: str | None, ours: str | None) -> str | None:
    if ours is None:
        return existing
    return ours if not existing else f"{existing}|{ours}"


def request_cache_salt(existing: str | None, extra_args: dict | None,
                       request_id: str) -> str | None:
    """The ``cache_salt`` of a request with these ``SamplingParams.extra_args``."""
    return salted(existing, flux_cache_salt((extra_args or {}).get(EXTRA_ARGS_KEY), request_id))
