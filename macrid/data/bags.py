"""The sparse batch layout shared by data and model code, in plain torch (no I/O imports).

A batch of B users is `indices (N,)` item ids and `offsets (B+1,)`, the layout of
`torch.nn.functional.embedding_bag`: user b owns indices[offsets[b]:offsets[b+1]].
"""

from __future__ import annotations

import torch


def bag_rows(offsets: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """offsets (B+1,) -> the user row of each of the N non-zeros, (N,), on offsets' device.

    n: N when the caller knows it (len(indices)). Passing it saves a device-to-host sync on CUDA,
    where repeat_interleave would otherwise read the total back to size its output.
    """
    B = len(offsets) - 1
    rows = torch.arange(B, device=offsets.device)  # (B,)
    if n is None:
        return torch.repeat_interleave(rows, offsets.diff())
    return torch.repeat_interleave(rows, offsets.diff(), output_size=n)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device. On CUDA through pinned memory with non_blocking, so the copy overlaps compute."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
