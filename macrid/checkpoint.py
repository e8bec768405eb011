"""Checkpoints: weights, optimizer, counters, config and the vocabulary fingerprint, in one file.

A checkpoint is refused by any dataset whose item vocabulary differs: the item
tables are indexed by item_idx, so loading one into another vocabulary would
silently recommend the wrong items.
"""

from __future__ import annotations

import os
import uuid

import torch

from macrid.errors import CheckpointError


def save(path: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, step: int, epoch: int,
         config: dict, n_items: int, fingerprint: str, extra: dict | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
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
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a reader sees the old checkpoint or the new one, never half of one


def load(path: str, fingerprint: str | None = None) -> dict:
    """Load a checkpoint; refuse it when `fingerprint` (the dataset's) differs from the one it was trained on."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint; list <lake>/runs/<run>/checkpoints/")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if fingerprint is not None and state["vocabulary_fingerprint"] != fingerprint:
        raise CheckpointError(
            f"{path}: trained on item vocabulary {state['vocabulary_fingerprint'][:12]} "
            f"but the dataset has vocabulary {fingerprint[:12]}; use a checkpoint trained on this dataset "
            "or retrain"
        )
    return state
