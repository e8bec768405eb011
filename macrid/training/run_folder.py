"""A run's folder in the lake: its fixed file names, the record of what it trains on (run.json), and
whether it already holds a run. Paths come from the lake's layout (macrid/data/layout.py)."""

from __future__ import annotations

import dataclasses

import pyarrow as pa

from macrid.config import Config
from macrid.data import lake, layout
from macrid.data.layout import load_meta
from macrid.errors import CheckpointError, ConfigError, DataError

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints
METRICS_FILE = "metrics.json"  # the finished run's validation and test scores, config and history
MODEL_FILE = "model.pt"  # the published best model: evaluation weights, config, vocabulary
RUN_FILE = "run.json"  # what the run trains on: dataset, vocabulary fingerprint, runner (ray or in-process)
# the item vocabulary the run trains on (item_idx, item_id, title, genres), kept with the run: the dataset
# version it read is pruned after later prepares, and a warm start, the gate and the export need the IDs
VOCABULARY_FILE = "vocabulary.parquet"


def run_uri(cfg: Config) -> str:
    return layout.run_uri(cfg.data.lake, cfg.run.name)


def holds_checkpoint(cfg: Config) -> bool:
    """Whether the run folder holds a checkpoint to continue from (Ray Train's record, or in-process)."""
    run = run_uri(cfg)
    return lake.exists(f"{run}/{RAY_SNAPSHOT}") or lake.exists(f"{run}/checkpoints/latest.pt")


def require_resumable(cfg: Config) -> None:
    """--resume: the run must exist and hold a checkpoint; resuming a run that never existed would quietly start a
    new one under a name the user believes holds their earlier training."""
    if not cfg.run.name:
        raise ConfigError("--resume needs the run's name: add --set run.name=<the run to continue>")
    if not holds_checkpoint(cfg):
        raise ConfigError(f"{run_uri(cfg)}: no run to resume there (no checkpoint); check the name and --lake "
                          f"(ls {layout.runs_uri(cfg.data.lake)}), start it without --resume, or pass --resume if-any "
                          "to start it when it has none yet")


def has_run(cfg: Config) -> bool:
    """Whether the run folder already holds a run (Ray's or in-process); refused unless run.resume is set."""
    run = run_uri(cfg)
    if not holds_checkpoint(cfg):
        return False
    if not cfg.run.resume:
        raise ConfigError(f"{run} already holds a run; pass --resume to continue it or pick another "
                          "--set run.name=...")
    return True


def pin_run(cfg: Config, runner: str) -> tuple[Config, dict]:
    """Pin the dataset version the run reads and record what it trains on (run.json), or check a resume.

    runner: "ray" or "in-process". A new run pins the current version of its dataset; a resumed run
    keeps the version it started on, even after `prepare --overwrite` published another. Checked on
    the driver before any worker starts, so a wrong resume fails at once with the cause instead of
    inside every worker (where Ray would retry it). Returns the pinned config and the version's meta.
    """
    path = lake.join(run_uri(cfg), RUN_FILE)
    claimed = lake.read_json(path) if lake.exists(path) else None
    if claimed is not None and not holds_checkpoint(cfg):
        claimed = None  # a run that failed before its first checkpoint left only its record: start afresh
    if claimed is not None and claimed["dataset"] != cfg.data.dataset:
        raise CheckpointError(
            f"{run_uri(cfg)}: trained on dataset {claimed['dataset']!r} (item vocabulary "
            f"{claimed['vocabulary_fingerprint'][:12]}) but data.dataset={cfg.data.dataset!r}; resume it on the "
            "same dataset, or start a new run with --set run.name=...")
    version = cfg.data.version or (claimed or {}).get("version") or \
        load_meta(cfg.data.lake, cfg.data.dataset).get("version", "")
    meta = load_meta(cfg.data.lake, cfg.data.dataset, version)
    fingerprint = meta["vocabulary_fingerprint"]
    if claimed is None:
        items = lake.read_table(lake.join(layout.dataset_uri(cfg.data.lake, cfg.data.dataset, version), "items"))
        lake.write_parquet(lake.join(run_uri(cfg), VOCABULARY_FILE),
                           items.select([c for c in ("item_idx", "item_id", "title", "genres") if c in items.column_names]))
        lake.write_json(path, {"dataset": cfg.data.dataset, "version": version, "vocabulary_fingerprint": fingerprint,
                               "runner": runner, "model": cfg.model.name})
    elif claimed["vocabulary_fingerprint"] != fingerprint:
        raise CheckpointError(
            f"{run_uri(cfg)}: trained on item vocabulary {claimed['vocabulary_fingerprint'][:12]} but version "
            f"{version!r} of {cfg.data.dataset!r} has {fingerprint[:12]}; start a new run with --set run.name=...")
    elif claimed["runner"] != runner:
        how = "jobs/train.py --resume" if claimed["runner"] == "ray" else "jobs/train.py --in-process --resume"
        raise ConfigError(f"{run_uri(cfg)} was trained {'under Ray Train' if claimed['runner'] == 'ray' else 'in-process'}"
                          f"; its checkpoints are kept that way, so continue it with {how}")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, version=version)), meta


def read_vocabulary(lake_root: str, run: str) -> pa.Table:
    """The run's item vocabulary in item_idx order: its own copy, or (runs from before the copy) the items
    table of the dataset version it read, while that version is kept."""
    folder = layout.run_uri(lake_root, run)
    own = lake.join(folder, VOCABULARY_FILE)
    if lake.exists(own):
        return lake.read_parquet(own).sort_by("item_idx")
    record_uri = lake.join(folder, RUN_FILE)
    if not lake.exists(record_uri):
        raise CheckpointError(f"{folder}: no {RUN_FILE}, so the run's vocabulary is unknown; pass a run trained by "
                              "jobs/train.py")
    record = lake.read_json(record_uri)
    try:
        uri = lake.join(layout.dataset_uri(lake_root, record["dataset"], record.get("version", "")), "items")
        return lake.read_table(uri).sort_by("item_idx")
    except DataError:
        raise CheckpointError(f"{folder}: the dataset version it trained on ({record.get('version')}) is gone and the "
                              f"run keeps no {VOCABULARY_FILE}; its item IDs cannot be recovered: retrain") from None
