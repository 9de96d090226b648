"""Where a paged KV cache keeps each slot's K and V (the layout our ops read and write).

Every layout here has vLLM's cache shape ``kv_cache[num_blocks, num_kv_heads, block_size,
2 * head_size]``, and each (block, KV head) owns its ``2 * block_size * head_size`` elements
(contiguous: ``stride(2) == 2 * head_size``, ``stride(3) == 1``). Layouts differ inside that
region, which ``KVLayout`` describes by the element offsets of ``K[slot, d]`` and ``V[slot, d]``:

- ``slot_major``: slot ``j``'s K then V, ``kv[b, h, j, :D]`` and ``kv[b, h, j, D:]``. The Triton
  kernels and the GPU backend use it.
- vLLM's CPU attention: an ISA-specific layout written by its own C++ op (VEC: K as
  ``[D, block_size]`` row-major, then V as ``[block_size, D]``; AMX: packed tiles). The CPU
  backend derives its ``KVLayout`` with ``probe``, by writing coded values through vLLM's own
  writer, so no ISA's layout is written down here.

The references (``kernels.reference``) read and write any ``KVLayout`` through the helpers below.
A layout whose offsets are affine in ``(slot, d)`` is read as a strided view of the cache (no
index tensor); any other permutation through its offset tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class KVLayout:
    """Element offsets of ``K[slot, d]`` (``k_offsets [block_size, head_size]`` int64) and of
    ``V[slot, d]`` (``v_offsets``) inside one (block, KV head) region of
    ``2 * block_size * head_size`` elements; together a permutation of the region."""

    name: str
    k_offsets: Tensor
    v_offsets: Tensor
    # (slot stride, dim stride, base offset) of K and of V when the offsets are affine
    k_affine: tuple[int, int, int] | None = field(default=None, repr=False)
    v_affine: tuple[int, int, int] | None = field(default=None, repr=False)

    @property
    def block_size(self) -> int:
        return int(self.k_offsets.shape[0])

    @property
    def head_size(self) -> int:
        return int(self.k_offsets.shape[1])

    @property
    def is_slot_major(self) -> bool:
        d = self.head_size
        return self.k_affine == (2 * d, 1, 0) and self.v_affine == (2 * d, 1, d)


def _affine(off: Tensor) -> tuple[int, int, int] | None:
    bs, d = off.shape
    base = int(off[0, 0])
    s_slot = int(off[1, 0]) - base if bs > 1 else 0
    s_dim = int(off[0, 1]) - base if d > 1 else 0
    j = torch.arange(bs, dtype=torch.int64)[:, None]
    c = torch.arange(d, dtype=torch.int64)[None, :]
    return (s_slot, s_dim, base) if torch.equal(off, base + j * s_slot + c * s_dim) else None


def from_offsets(name: str, k_offsets: Tensor, v_offsets: Tensor) -> KVLayout:
    """A ``KVLayout`` from its offset tables. Raises ``ValueError`` unless both are
    ``[block_size, head_size]`` and together cover each offset of the region exactly once."""
    if k_offsets.shape != v_offsets.shape or k_offsets.dim() != 2:
        raise ValueError(f"layout {name}: offset tables {tuple(k_offsets.shape)} and "
                         f"{tuple(v_offsets.shape)}, expected two [block_size, head_size]")
    k_offsets = k_offsets.to(torch.int64).contiguous()
    v_offsets = v_offsets.to(torch.int64).contiguous()
    region = 2 * k_offsets.numel()
    seen = torch.cat([k_offsets.flatten(), v_offsets.flatten()])
    if int(seen.min()) < 0 or int(seen.max()) >= region or seen.unique().numel() != region:
        raise ValueError(f"layout {name}: the K and V offsets are not a permutation of the "
                         f"{region} elements of a (block, KV head)")
    return KVLayout(name, k_offsets, v_offsets, _affine(k_offsets), _affine(v_offsets))


def slot_major(block_size: int, head_size: int) -> KVLayout:
    """Slot ``j``'s K in ``[..., j, :D]``, its V in ``[..., j, D:]``."""
    j = torch.arange(block_size, dtype=torch.int64)[:, None] * 2 * head_size
    d = torch.arange(head_size, dtype=torch.int64)[None, :]
    return from_offsets("slot_major", j + d, j + head_size + d)


# Digits written per probe pass: 1..16, exact in every float dtype (fp16, bf16 included).
_DIGIT = 16


def probe(name: str, write: Callable[[Tensor, Tensor, Tensor, Tensor], None], block_size: int,
          head_size: int, dtype: torch.dtype) -> KVLayout:
    """The layout an opaque KV writer uses, found by writing coded values through it.

    ``write(key, value, kv_cache, slot_mapping)`` must store ``key``/``value
    [block_size, 1, head_size]`` (``dtype``) at ``slot_mapping [block_size]`` int64 of the
    one-block, one-head ``kv_cache [1, 1, block_size, 2 * head_size]``, as the cache's owner
    writes every step. Each pass writes one base-16 digit of every element's index. Raises
    ``ValueError`` if what lands is not a permutation (e.g. a quantizing writer).
    """
    n = block_size * head_size
    index = torch.arange(n, dtype=torch.int64).reshape(block_size, 1, head_size)
    slots = torch.arange(block_size, dtype=torch.int64)
    passes = max(1, math.ceil(math.log(n, _DIGIT)))
    tables = []
    for value_side in (False, True):
        code = torch.zeros(2 * n, dtype=torch.int64)  # per element of the region: its index
        written = None
        for p in range(passes):
            digit = ((index // _DIGIT ** p) % _DIGIT + 1).to(dtype)
            cache = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
            zero = torch.zeros_like(digit)
            write(zero if value_side else digit, digit if value_side else zero, cache, slots)
            got = cache.flatten().to(torch.float32).round().to(torch.int64)
            written = got > 0 if written is None else written
            if not torch.equal(got > 0, written) or int(got.max()) > _DIGIT:
                raise ValueError(f"layout {name}: the writer does not store the values it is "
                                 "given (a quantized KV cache?)")
            code += (got - 1).clamp(min=0) * _DIGIT ** p
        where = written.nonzero().flatten()
        if (where.numel() != n or code[where].unique().numel() != n
                or int(code[where].max()) >= n):
            raise ValueError(f"layout {name}: the writer does not store {n} distinct elements "
                             f"per side (a quantized or padded KV cache)")
        offsets = torch.empty(n, dtype=torch.int64)
        offsets[code[where]] = where
        tables.append(offsets)
    k_offsets, v_offsets = tables
    return from_offsets(name, k_offsets.reshape(block_size, head_size),
                        v_offsets.reshape(block_size, head_size))


def _check(kv_cache: Tensor, layout: KVLayout) -> None:
    _, _, bs, d2 = kv_cache.shape
    if bs != layout.block_size or d2 != 2 * layout.head_size:
        raise ValueError(f"kv_cache {tuple(kv_cache.shape)} does not match layout "
                         f"{layout.name} (block {layout.block_size}, head {layout.head_size})")
    if kv_cache.stride(3) != 1 or kv_cache.stride(2) != d2:
        raise ValueError(f"kv_cache strides {kv_cache.stride()}: each (block, KV head) must be "
                         "contiguous")


def _side_view(kv_cache: Tensor, affine: tuple[int, int, int]) -> Tensor:
    nb, hkv, bs, d2 = kv_cache.shape
    s_slot, s_dim, base = affine
    return torch.as_strided(kv_cache, (nb, hkv, bs, d2 // 2),
                            (kv_cache.stride(0), kv_cache.stride(1), s_slot, s_dim),
                            kv_cache.storage_offset() + base)


def _regions(kv_cache: Tensor) -> Tensor:
    nb, hkv, bs, d2 = kv_cache.shape
    return torch.as_strided(kv_cache, (nb, hkv, bs * d2), (kv_cache.stride(0),
                            kv_cache.stride(1), 1), kv_cache.storage_offset())


def kv_views(kv_cache: Tensor, layout: KVLayout) -> tuple[Tensor, Tensor] | None:
    """``(k, v)``, each a ``[num_blocks, Hkv, block_size, D]`` view of the cache (writes go
    through), when the layout is affine; None otherwise."""
    _check(kv_cache, layout)
    if layout.k_affine is None or layout.v_affine is None:
        return None
    return _side_view(kv_cache, layout.k_affine), _side_view(kv_cache, layout.v_affine)


def gather_blocks(kv_cache: Tensor, layout: KVLayout, blocks: Tensor,
                  dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """K and V of the given physical blocks (``blocks [n]`` int64) in slot order, each a new
    contiguous ``[Hkv, n * block_size, D]`` tensor in ``dtype`` (default: the cache's).

    Whole (block, head) regions are copied first (contiguous runs), then K and V are read out
    of the copy, converted in the same pass."""
    hkv, bs, d = kv_cache.shape[1], layout.block_size, layout.head_size
    dtype = dtype or kv_cache.dtype
    # along dim 0 of the cache's own view: index_select on a transposed view would first copy
    # the whole cache
    reg = _regions(kv_cache).index_select(0, blocks)  # [n, Hkv, 2 * bs * D]
    n, size = reg.shape[0], reg.shape[2]
    if layout.k_affine is not None and layout.v_affine is not None:
        return tuple(torch.as_strided(reg, (hkv, n, bs, d), (size, hkv * size, s_slot, s_dim),
                                      base).to(dtype).reshape(hkv, n * bs, d)
                     for s_slot, s_dim, base in (layout.k_affine, layout.v_affine))
    reg = reg.transpose(0, 1)
    return (reg[..., layout.k_offsets.flatten()].to(dtype).reshape(hkv, -1, d),
            reg[..., layout.v_offsets.flatten()].to(dtype).reshape(hkv, -1, d))


def read_slots(kv_cache: Tensor, layout: KVLayout, blocks: Tensor, heads: Tensor,
               slots: Tensor) -> tuple[Tensor, Tensor]:
    """K and V at (``blocks``, ``heads``, in-block ``slots``), three int64 tensors of one shape
    ``S``: two new ``[*S, D]`` tensors."""
    views = kv_views(kv_cache, layout)
    if views is not None:
        return views[0][blocks, heads, slots], views[1][blocks, heads, slots]
    reg = _regions(kv_cache)
    return (reg[blocks[..., None], heads[..., None], layout.k_offsets[slots]],
            reg[blocks[..., None], heads[..., None], layout.v_offsets[slots]])


def write_slots(kv_cache: Tensor, layout: KVLayout, blocks: Tensor, heads: Tensor,
                slots: Tensor, k: Tensor, v: Tensor) -> None:
    """In place: K and V ``[*S, D]`` to (``blocks``, ``heads``, in-block ``slots``), as in
    ``read_slots``."""
    views = kv_views(kv_cache, layout)
    if views is not None:
        views[0][blocks, heads, slots] = k.to(kv_cache.dtype)
        views[1][blocks, heads, slots] = v.to(kv_cache.dtype)
        return
    reg = _regions(kv_cache)
    reg[blocks[..., None], heads[..., None], layout.k_offsets[slots]] = k.to(kv_cache.dtype)
    reg[blocks[..., None], heads[..., None], layout.v_offsets[slots]] = v.to(kv_cache.dtype)
