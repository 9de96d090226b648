"""Host integer helpers for launch grids and block sizes.

The same functions as ``triton.cdiv`` and ``triton.next_power_of_2``, in plain integer
arithmetic: Triton's own are slow Python on the launch path (they unwrap ``constexpr``
arguments first, ~1.4 µs a call in Triton 3.x, and a decode launch makes several). This module
imports nothing, so the modules that keep Triton a lazy import can use it too.
"""

from __future__ import annotations

__all__ = ["cdiv", "next_power_of_2"]


def cdiv(x: int, y: int) -> int:
    """``ceil(x / y)`` for ints, ``y > 0``: ``triton.cdiv``'s ``(x + y - 1) // y``."""
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` for ``n >= 1``; 0 for ``n <= 0`` (as
    ``triton.next_power_of_2``)."""
    n = int(n)  # also numpy / torch integer scalars, as Triton's accepts
    return 1 << (n - 1).bit_length() if n > 0 else 0
