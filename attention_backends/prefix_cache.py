"""Keeping vLLM's prefix cache correct under Flux routing.

A layer running sparse attention produces different hidden states, hence different K/V in every
later layer: a prompt's cached blocks are only reusable by a request that routes its layers the
same way. vLLM keys cached blocks by the request's ``cache_salt``, so each request gets a salt
derived from its flux options:

- ``full`` (or no flux options): unchanged, so it shares blocks with stock vLLM requests;
- ``sparse`` / ``layers``: the canonical options, so identical configurations share blocks;
- ``auto``: the request id (no sharing), since its decisions depend on its own prompt.

``install()`` wraps vLLM's ``InputProcessor.process_inputs`` (the API process builds every
engine request there) to add the salt; a caller's own ``cache_salt`` is kept as a prefix.
"""

from __future__ import annotations

import functools
import json

from attention_backends.options import EXTRA_ARGS_KEY


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


def install() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    orig = InputProcessor.process_inputs
    if getattr(orig, "_fluxserve_wrapped", False):
        return

    @functools.wraps(orig)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        req = orig(self, request_id, prompt, params, *args, **kwargs)
        extra = getattr(params, "extra_args", None) or {}
        ours = flux_cache_salt(extra.get(EXTRA_ARGS_KEY), request_id)
        if ours is not None:
            req.cache_salt = salted(req.cache_salt, ours)
        return req

    process_inputs._fluxserve_wrapped = True  # type: ignore[attr-defined]
    InputProcessor.process_inputs = process_inputs
