"""Per-head attention masks in a local Hugging Face causal LM, for the offline head experiments
of ``fluxserve eval heads-ablate``.

`MaskedRunner` runs a transformers model (batch of one) through an attention function of its own,
registered with transformers' ``AttentionInterface``. It keeps the KV of every layer in its own
buffers, so one prefill can be continued several times (`truncate` back to the prompt, then
decode again under other masks). Two kinds of mask, both per head (`HeadMask`):

- **sparse heads**: a query head forced to Flux's sparse attention for every query, prefill and
  decode: key ``j`` is visible to the query at position ``p`` iff ``j <= p`` and
  ``(j < sink or j > p - window)``, the visibility rule of the engine's kernels
  (``attention_backends.kernels.reference``);
- **kept prompt keys**: per layer and KV head, the prompt positions an eviction policy kept. They
  bind the queries at positions ``>= prompt_len`` (decode), as eviction after prefill does in the
  engine; generated tokens stay visible. This is a simulation by masking: per-head sets of any
  size, which the served paged layout (exactly ``budget`` tokens per KV head) cannot hold.

Prefill runs PyTorch's fused causal SDPA for all heads, then recomputes the sparse heads with
their local mask (only ``sink + window`` keys per query); decode steps compute masked attention
in float32, on one thread on a CPU. The model's weights are not changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

ATTN_IMPLEMENTATION = "fluxserve_head_masks"
# Queries per chunk of the local (sink + window) recomputation of a sparse head in prefill.
_LOCAL_CHUNK = 512
# Queries per chunk of the general masked path (the mask is [heads, chunk, keys] booleans).
_MASKED_CHUNK = 64


@dataclass(frozen=True)
class HeadMask:
    """What each query may see beyond causality (see the module docstring).

    ``sparse``: layer -> query heads forced to sink + window attention (``sink >= 0``,
    ``window >= 1`` tokens, the query's own position included).
    ``kept``: layer -> bool ``[num_kv_heads, prompt_len]``, the prompt keys each KV head keeps for
    the queries at positions ``>= prompt_len``; a layer that is absent keeps everything.
    """

    sparse: Mapping[int, Sequence[int]] = field(default_factory=dict)
    sink: int = 0
    window: int = 1
    kept: Mapping[int, Tensor] = field(default_factory=dict)
    prompt_len: int = 0

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 1:
            raise ValueError(f"need sink >= 0 and window >= 1, got {self.sink}, {self.window}")
        if self.kept and self.prompt_len < 1:
            raise ValueError("kept prompt keys need the prompt length")


NO_MASK = HeadMask()


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of `model` in layer order (those with a ``layer_idx``).

    Raises ValueError when there are none."""
    found = [m for _, m in model.named_modules()
             if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]
    found.sort(key=lambda m: m.layer_idx)
    if not found:
        raise ValueError(f"no attention modules with a layer_idx in {type(model).__name__}")
    return found


def _attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
               dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature: ``query [1, Hq, Lq, D]``, ``key``/``value``
    ``[1, Hkv, Lq, D]`` (the new tokens only: the runner holds the cache); returns
    ``([1, Lq, Hq, D], None)``."""
    for name in ("sliding_window", "softcap"):
        if kwargs.get(name) is not None:
            raise ValueError(f"head masks do not support attention with {name}")
    runner: MaskedRunner = module._fluxserve_runner
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return runner._attend(module.layer_idx, query, key, value, float(scale)), None


@contextmanager
def _one_cpu_thread(device: torch.device):
    """Run the block on one PyTorch thread when `device` is a CPU. A decode step is many small
    operations: a second thread costs more in synchronisation than it saves (5 to 10 times
    slower per step on a busy 2-core machine)."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)


class MaskedRunner:
    """Greedy prefill/decode of one sequence under a `HeadMask`.

    ``model`` is a loaded transformers causal LM whose attention modules call the configured
    attention function (Llama, Mistral, Qwen2/3 and the like); batch size is 1. The runner
    switches the model to its own attention implementation.
    """

    def __init__(self, model: torch.nn.Module):
        _register()
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.model = model
        cfg = model.config
        self.modules = attention_modules(model)
        self.num_layers = len(self.modules)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.group = self.num_heads // self.num_kv_heads
        for m in self.modules:
            m._fluxserve_runner = self
        self._k: list[Tensor] = []
        self._v: list[Tensor] = []
        self.length = 0  # tokens in the KV buffers
        self.mask = NO_MASK
        self.capture = 0
        self.captured: dict[int, Tensor] = {}
        self.scales: dict[int, float] = {}
        self._key_ok_cache: dict[int, Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- forward passes ----------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, ids: Sequence[int], mask: HeadMask = NO_MASK, capture: int = 0,
                reserve: int = 0) -> Tensor:
        """Run the prompt ``ids`` from an empty cache; returns the last position's logits
        ``[vocab]`` float32.

        ``capture``: keep the last ``capture`` queries of every layer (RoPE applied) in
        ``captured[layer]`` as ``[capture, Hq, D]`` (SnapKV's observation window; 0: none).
        ``reserve``: decode tokens to allocate room for (more are still accepted)."""
        n = len(ids)
        if n < 1:
            raise ValueError("empty prompt")
        if capture > n:
            raise ValueError(f"cannot capture {capture} queries of a {n}-token prompt")
        self._allocate(n + reserve)
        self._set_mask(mask)
        self.length, self.capture, self.captured = 0, capture, {}
        try:
            out = self.model(input_ids=torch.tensor([list(ids)], device=self.device),
                             position_ids=torch.arange(n, device=self.device)[None],
                             use_cache=False, logits_to_keep=1)
        finally:
            self.capture = 0
        self.length = n
        return out.logits[0, -1].float()

    @torch.no_grad()
    def step(self, token: int, mask: HeadMask = NO_MASK) -> Tensor:
        """Append one token at position ``length``; returns its logits ``[vocab]`` float32."""
        self._set_mask(mask)
        pos = self.length
        out = self.model(input_ids=torch.tensor([[token]], device=self.device),
                         position_ids=torch.tensor([[pos]], device=self.device),
                         use_cache=False, logits_to_keep=1)
        self.length = pos + 1
        return out.logits[0, -1].float()

    def _set_mask(self, mask: HeadMask) -> None:
        if mask is not self.mask:
            self.mask = mask
            self._key_ok_cache = {}

    def truncate(self, length: int) -> None:
        """Forget the KV of positions ``>= length`` (e.g. back to the prompt)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate {self.length} tokens to {length}")
        self.length = length

    def keys(self, layer: int) -> Tensor:
        """The cached keys of `layer` (RoPE applied), ``[Hkv, length, D]``."""
        return self._k[layer][:, :self.length]

    def values(self, layer: int) -> Tensor:
        """The cached values of `layer`, ``[Hkv, length, D]``."""
        return self._v[layer][:, :self.length]

    def greedy(self, first_logits: Tensor, max_tokens: int, stop_ids: set[int],
               mask: HeadMask = NO_MASK) -> list[int]:
        """Greedy continuation after a prefill: the argmax of ``first_logits``, then decode
        steps under `mask` until a stop token (included, as vLLM returns it) or ``max_tokens``
        tokens."""
        out = [int(first_logits.argmax())]
        with _one_cpu_thread(self.device):
            while out[-1] not in stop_ids and len(out) < max_tokens:
                out.append(int(self.step(out[-1], mask).argmax()))
        return out

    # -- attention ---------------------------------------------------------------------------

    def _allocate(self, capacity: int) -> None:
        ref = self.modules[0]
        dim = int(getattr(ref, "head_dim", 0) or
                  self.model.config.hidden_size // self.num_heads)
        dtype = next(self.model.parameters()).dtype
        if self._k and self._k[0].shape[1] >= capacity and self._k[0].dtype == dtype:
            return
        shape = (self.num_kv_heads, capacity, dim)
        self._k = [torch.empty(shape, dtype=dtype, device=self.device)
                   for _ in range(self.num_layers)]
        self._v = [torch.empty(shape, dtype=dtype, device=self.device)
                   for _ in range(self.num_layers)]

    def _grow(self, layer: int, needed: int) -> None:
        k, v = self._k[layer], self._v[layer]
        extra = max(needed - k.shape[1], 64)
        self._k[layer] = torch.cat([k, k.new_empty(k.shape[0], extra, k.shape[2])], dim=1)
        self._v[layer] = torch.cat([v, v.new_empty(v.shape[0], extra, v.shape[2])], dim=1)

    def _attend(self, layer: int, query: Tensor, key: Tensor, value: Tensor,
                scale: float) -> Tensor:
        start, lq = self.length, query.shape[2]
        end = start + lq
        if self._k[layer].shape[1] < end:
            self._grow(layer, end)
        self._k[layer][:, start:end] = key[0]
        self._v[layer][:, start:end] = value[0]
        k, v = self._k[layer][:, :end], self._v[layer][:, :end]
        q = query[0]  # [Hq, Lq, D]
        self.scales[layer] = scale
        if self.capture and start == 0:
            self.captured[layer] = q[:, lq - self.capture:].transpose(0, 1).clone()
        mask = self.mask
        if start == 0 and lq > 1 and (not mask.kept or lq <= mask.prompt_len):
            # Prefill: every query is a prompt position, so kept sets do not apply.
            out = F.scaled_dot_product_attention(query, k[None], v[None], is_causal=True,
                                                 scale=scale, enable_gqa=True)[0]
            for h in mask.sparse.get(layer, ()):
                out[h] = self._local(q[h], k[h // self.group], v[h // self.group], scale)
        else:
            out = torch.cat([self._masked(layer, q[:, i:i + _MASKED_CHUNK], k, v, start + i,
                                          scale)
                             for i in range(0, lq, _MASKED_CHUNK)], dim=1)
        return out.transpose(0, 1)[None]

    def _local(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """One head's prefill under sink + window visibility, ``q/k/v [L, D]`` -> ``[L, D]``.
        Each chunk of queries reads only the sink keys and the keys of its windows."""
        sink, window = self.mask.sink, self.mask.window
        n = q.shape[0]
        out = torch.empty_like(q)
        dev = q.device
        for c0 in range(0, n, _LOCAL_CHUNK):
            c1 = min(n, c0 + _LOCAL_CHUNK)
            sink_end = min(sink, c1)
            idx = torch.cat([torch.arange(sink_end, device=dev),
                             torch.arange(max(sink_end, c0 - window + 1), c1, device=dev)])
            pos = torch.arange(c0, c1, device=dev)[:, None]
            visible = (idx[None] <= pos) & ((idx[None] < sink) | (idx[None] > pos - window))
            scores = (q[c0:c1].float() @ k[idx].float().T) * scale
            probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            out[c0:c1] = (probs @ v[idx].float()).to(q.dtype)
        return out

    def _key_ok(self, layer: int, kept: Tensor) -> Tensor:
        """bool ``[Hkv, capacity]``: the kept prompt keys, then every later position (built once
        per mask and layer)."""
        capacity = self._k[layer].shape[1]
        cached = self._key_ok_cache.get(layer)
        if cached is None or cached.shape[1] != capacity:
            p = self.mask.prompt_len
            if tuple(kept.shape) != (self.num_kv_heads, p):
                raise ValueError(f"kept mask of layer {layer} has shape {tuple(kept.shape)}, "
                                 f"expected ({self.num_kv_heads}, {p})")
            cached = torch.ones(self.num_kv_heads, capacity, dtype=torch.bool,
                                device=self._k[layer].device)
            cached[:, :p] = kept.to(cached.device)
            self._key_ok_cache[layer] = cached
        return cached

    def _masked(self, layer: int, q: Tensor, k: Tensor, v: Tensor, start: int,
                scale: float) -> Tensor:
        """Attention of queries ``q [Hq, Lq, D]`` at positions ``start..`` over all cached keys
        ``k/v [Hkv, Lk, D]`` with the full per-head visibility, in float32. The G query heads of
        a KV head are rows of one matmul."""
        mask = self.mask
        hq, lq, d = q.shape
        hkv, g = self.num_kv_heads, self.group
        lk = k.shape[1]
        dev = q.device
        scores = (q.float().reshape(hkv, g * lq, d) @ k.float().transpose(1, 2)) * scale
        scores = scores.view(hkv, g, lq, lk)
        qpos = torch.arange(start, start + lq, device=dev)[:, None]  # [Lq, 1]
        kpos = torch.arange(lk, device=dev)[None, :]  # [1, Lk]
        if start + lq != lk or lq > 1:  # a single last query sees every key: no causal mask
            scores.masked_fill_(kpos > qpos, float("-inf"))
        kept = mask.kept.get(layer) if mask.kept else None
        if kept is not None:
            hidden = ~self._key_ok(layer, kept)[:, None, None, :lk]  # [Hkv, 1, 1, Lk]
            if start < mask.prompt_len:  # some queries are prompt positions: not bound
                hidden = hidden & (qpos >= mask.prompt_len)
            scores.masked_fill_(hidden, float("-inf"))
        for h in mask.sparse.get(layer, ()):
            far = (kpos >= mask.sink) & (kpos <= qpos - mask.window)  # [Lq, Lk]
            scores[h // g, h % g].masked_fill_(far, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(hkv, g * lq, lk)
        return (probs @ v.float()).view(hq, lq, d).to(q.dtype)
