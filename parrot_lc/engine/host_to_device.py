"""Host values onto the device without waiting for the device's queued work, so that the engine builds a step
while the step before still runs."""

from __future__ import annotations

import torch


def to_device(values: list | torch.Tensor, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`values` (a list, or a CPU tensor) on `device`. On a GPU the values go through page-locked memory: a copy
    from pageable memory may wait for the work already queued on the stream."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    # The caching host allocator keeps the pinned buffer until the copy has run (it records the copy's event).
    return tensor.pin_memory().to(device, non_blocking=True)
