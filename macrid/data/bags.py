"""The sparse batch layout shared by data and model code, in plain torch (no I/O imports).

A batch of B users is `indices (N,)` item ids and `offsets (B+1,)`, the layout of
`torch.nn.functional.embedding_bag`: user b owns indices[offsets[b]:offsets[b+1]].
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

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
    """Host tensor -> device. On CUDA through pinned memory with non_blocking, so the copy overlaps compute
    (a batch `pinned_ahead` already pinned is not pinned again)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


def pinned_ahead(batches: Iterator[tuple[torch.Tensor, ...]], pin: bool = True,
                 depth: int = 2) -> Iterator[tuple[torch.Tensor, ...]]:
    """The same batches, in order, made (and page-locked, with pin) by a background thread up to `depth`
    ahead: pinning a batch costs a host copy, which then overlaps the GPU's work instead of delaying the
    next step. An error in the producer is raised here, at the batch where it happened."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for batch in batches:
                item = tuple(t.pin_memory() for t in batch) if pin else batch
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 (re-raised in the consumer)
            q.put(e)

    thread = threading.Thread(target=produce, name="macrid-pin", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def dense_rows(indices: torch.Tensor, offsets: torch.Tensor, n_items: int) -> torch.Tensor:
    """CSR batch -> dense (B, M) 0/1 matrix. For the closed-form baselines only (small M)."""
    x = torch.zeros(len(offsets) - 1, n_items, device=indices.device)  # (B, M)
    x[bag_rows(offsets, len(indices)), indices] = 1.0
    return x
