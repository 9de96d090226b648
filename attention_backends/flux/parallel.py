"""Tensor-parallel helpers that also work outside a vLLM worker (unit tests, TP=1)."""

from __future__ import annotations

from torch import Tensor


def _tp_group():
    try:
        from vllm.distributed import parallel_state as ps

        if ps.model_parallel_is_initialized():
            return ps.get_tp_group()
    except Exception:  # vLLM not importable or distributed state not set up
        return None
    return None


def tp_world_size() -> int:
    g = _tp_group()
    return g.world_size if g is not None else 1


def tp_rank() -> int:
    g = _tp_group()
    return g.rank_in_group if g is not None else 0


def is_first_rank() -> bool:
    return tp_rank() == 0


def tp_all_reduce_sum(x: Tensor) -> Tensor:
    """Sum ``x`` over the tensor-parallel ranks (identity at TP=1)."""
    g = _tp_group()
    if g is None or g.world_size == 1:
        return x
    return g.all_reduce(x)
