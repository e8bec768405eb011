"""Checkpoints: weights, optimizer, counters, config and the vocabulary fingerprint, in one file.

A checkpoint is refused by any dataset whose item vocabulary differs: the item
tables are indexed by item_idx, so loading one into another vocabulary would
silently recommend the wrong items.

Loading is `torch.load(weights_only=True)`: only tensors, numbers, strings and plain
containers are unpickled, so a tampered file cannot run code; it is refused with a
CheckpointError instead.
"""

from __future__ import annotations

import io
import pickle

import torch

from macrid.config import Config
from macrid.data import lake
from macrid.errors import CheckpointError, DataError
from macrid.model.vae import build_model
from macrid.training.run_folder import MODEL_FILE

FILE = "checkpoint.pt"  # the file inside a Ray Train checkpoint folder


def to_bytes(*, model: torch.nn.Module, optimizer=None, step: int, epoch: int, config: dict, n_items: int,
             fingerprint: str, extra: dict | None = None) -> bytes:
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},  # loads on any device
        "optimizer": _to_cpu(optimizer.state_dict()) if optimizer is not None else None,
        "step": step,
        "epoch": epoch,
        "config": config,
        "n_items": n_items,
        "vocabulary_fingerprint": fingerprint,
        "extra": _to_cpu(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save(path: str,  # a local path or s3:// URI
         **parts) -> None:
    lake.write_bytes(path, to_bytes(**parts))  # atomic: a reader sees the old checkpoint or the new one


def from_bytes(data: bytes, source: str, fingerprint: str | None = None) -> dict:
    """Unpickle safely; refuse a file that holds anything but weights and plain data, or another vocabulary."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{source}: not a macrid checkpoint that can be loaded safely ({first[:200]}); nothing from it was "
            "run. Use a checkpoint written by macrid, or retrain") from None
    if not isinstance(state, dict) or "model" not in state or "vocabulary_fingerprint" not in state:
        raise CheckpointError(f"{source}: not a macrid checkpoint (no model weights or vocabulary fingerprint)")
    if fingerprint is not None and state["vocabulary_fingerprint"] != fingerprint:
        raise CheckpointError(
            f"{source}: trained on item vocabulary {state['vocabulary_fingerprint'][:12]} "
            f"but the dataset has vocabulary {fingerprint[:12]}; use a checkpoint trained on this dataset "
            "or retrain"
        )
    return state


def from_ray(ckpt, fingerprint: str | None = None) -> dict:
    """The checkpoint file inside a Ray Train Checkpoint (local or S3), read like `load`."""
    source = f"{ckpt.path}/{FILE}"
    with ckpt.filesystem.open_input_stream(source) as f:
        return from_bytes(f.read(), source, fingerprint)


def load(path: str, fingerprint: str | None = None) -> dict:
    """Load a checkpoint; refuse it when `fingerprint` (the dataset's) differs from the one it was trained on."""
    try:
        data = lake.read_bytes(path)
    except DataError:
        raise CheckpointError(f"{path}: no such checkpoint; list <lake>/runs/<run>/checkpoints/") from None
    return from_bytes(data, path, fingerprint)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def load_model(run: str, fingerprint: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained model from its run folder alone (constructor args live in model.pt)."""
    uri = lake.join(run, MODEL_FILE)
    saved = load(uri, fingerprint)
    cfg = Config.from_dict(saved["config"], source=uri)
    n_items = saved.get("n_items")
    # the declared catalogue size must be one the file's own tensors have: a tampered n_items (say 10^11)
    # would otherwise allocate terabytes in build_model before load_state_dict could notice
    dims = {d for v in saved.get("model", {}).values() if isinstance(v, torch.Tensor) for d in v.shape}
    if not isinstance(n_items, int) or n_items < 1 or n_items not in dims:
        raise CheckpointError(f"{uri}: declares n_items={n_items!r}, which none of its weight tensors has; the "
                              "file is damaged or was not written by this project. Re-publish the run")
    model = build_model(cfg.model, n_items)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{uri}: its weights do not fit its own config ({str(e).splitlines()[0][:200]}); "
                              "the file is damaged or was not written by this project") from None
    return model.eval(), saved
