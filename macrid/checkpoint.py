"""Checkpoints: weights, optimizer, counters, config and the vocabulary fingerprint, in one file.

A checkpoint is refused by any dataset whose item vocabulary differs: the item
tables are indexed by item_idx, so loading one into another vocabulary would
silently recommend the wrong items.
"""

from __future__ import annotations

import io

import torch

from macrid import lake
from macrid.errors import CheckpointError, DataError


def save(path: str,  # a local path or s3:// URI
         *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, step: int, epoch: int,
         config: dict, n_items: int, fingerprint: str, extra: dict | None = None) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": step,
        "epoch": epoch,
        "config": config,
        "n_items": n_items,
        "vocabulary_fingerprint": fingerprint,
        "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    lake.write_bytes(path, buf.getvalue())  # atomic: a reader sees the old checkpoint or the new one


def load(path: str, fingerprint: str | None = None) -> dict:
    """Load a checkpoint; refuse it when `fingerprint` (the dataset's) differs from the one it was trained on."""
    try:
        data = lake.read_bytes(path)
    except DataError:
        raise CheckpointError(f"{path}: no such checkpoint; list <lake>/runs/<run>/checkpoints/") from None
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    if fingerprint is not None and state["vocabulary_fingerprint"] != fingerprint:
        raise CheckpointError(
            f"{path}: trained on item vocabulary {state['vocabulary_fingerprint'][:12]} "
            f"but the dataset has vocabulary {fingerprint[:12]}; use a checkpoint trained on this dataset "
            "or retrain"
        )
    return state
