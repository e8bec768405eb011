"""A finished run as the outputs (export, explain) see it: its best model and the vocabulary it was trained on."""

from __future__ import annotations

import polars as pl

from macrid.data import lake, layout
from macrid.data.batches import load_meta
from macrid.errors import CheckpointError, DataError
from macrid.model.vae import MacridVAE
from macrid.training.run_folder import MODEL_FILE, RUN_FILE, VOCABULARY_FILE, read_vocabulary
from macrid.training.checkpoint import load_model


def published_run(lake_root: str, run_name: str) -> tuple[MacridVAE, dict, pl.DataFrame, dict]:
    """The run's published best model, and the vocabulary (item_idx, item_id, title) it was trained on."""
    run = layout.run_uri(lake_root, run_name)
    if not lake.exists(lake.join(run, MODEL_FILE)):
        raise CheckpointError(
            f"{run}: no {MODEL_FILE}, so the run has no published best model (it is missing, still training, or "
            f"failed); pass a finished run (ls {lake.join(lake_root, 'runs')}) or train it to the end")
    model, saved = load_model(run)
    if not isinstance(model, MacridVAE):
        raise CheckpointError(f"{run}: a {type(model).__name__} run; exports and explanations need a MacridVAE run (concepts)")
    record = lake.read_json(lake.join(run, RUN_FILE)) if lake.exists(lake.join(run, RUN_FILE)) else {}
    if not record:
        raise CheckpointError(f"{run}: no {RUN_FILE}, so the run's dataset is unknown; retrain with this version")
    version = record.get("version", "")
    try:
        load_meta(lake_root, record["dataset"], version)
    except DataError:  # the pinned version was pruned: the current one serves if its vocabulary is the same
        version = ""
    meta = load_meta(lake_root, record["dataset"], version)
    own_vocabulary = lake.exists(lake.join(run, VOCABULARY_FILE))  # runs keep their vocabulary since 0.3
    if meta["vocabulary_fingerprint"] != saved["vocabulary_fingerprint"] and not own_vocabulary:
        raise CheckpointError(
            f"{run}: trained on item vocabulary {saved['vocabulary_fingerprint'][:12]}, but dataset "
            f"{record['dataset']!r} now has {meta['vocabulary_fingerprint'][:12]} and the version the run read is "
            "gone; the item IDs cannot be recovered: retrain on the current dataset")
    vocab = pl.from_arrow(read_vocabulary(lake_root, run_name).select(["item_idx", "item_id", "title"]))
    record = dict(record, version=meta.get("version", ""), min_rating=meta["protocol"].get("min_rating"))
    return model, saved, vocab, record
