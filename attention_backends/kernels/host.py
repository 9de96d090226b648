"""Host-to-device copies of per-step metadata that never wait for the GPU.

``tensor.to("cuda")`` from ordinary (pageable) host memory synchronises the stream: the host
waits until every kernel queued before it has finished, so a copy per step or per layer stalls
the host behind the GPU. Staged through pinned memory (torch's caching host allocator, which
keeps the staging block alive until the copy has run) the copy is asynchronous.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; a host tensor goes to a CUDA device without a host sync. The host
    tensor may be changed or freed right after the call (the copy reads the pinned stage)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
