"""Raw interactions -> a dataset in the lake (layout in docs/architecture.md).

    <lake>/datasets/<name>/
        _meta.json                   the pointer: the current version's _meta.json (with "version")
        versions/<version>/          one immutable snapshot per prepare, <UTC time to the µs>-<random>
            items/part-0.parquet     item_idx:int32, item_id, title, genres (evaluation only), train_count:int64
            users/part-0.parquet     user_idx:int64, user_id, split
            train/part-*.parquet     user_idx, items: list<int32>          one row per user
            val/, test/              user_idx, foldin, heldout: list<int32>
            _meta.json               counts, protocol, schema version, vocabulary fingerprint, version

A prepare writes a new version folder (staged: a failed prepare leaves nothing a reader could take
as complete), then switches the pointer with one atomic write. Nothing is ever rewritten in place,
so a run that pinned a version at its start reads that version to its last epoch while
`prepare --overwrite` publishes the next one. The newest KEEP_VERSIONS versions are kept; older
ones are deleted. Datasets of schema 1 (tables at the dataset's root, no "version") are still read
as they are.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import uuid

import numpy as np
import polars as pl
import pyarrow.fs as pafs

from macrid.data import lake
from macrid.errors import DataError
from macrid.data.readers import RawData
from macrid.data.split import Protocol, Split, split_multvae

log = logging.getLogger(__name__)
SCHEMA_VERSION = 2  # 2: versioned snapshots behind the _meta.json pointer; 1: tables at the dataset's root
TRAIN_SHARD_USERS = 100_000
KEEP_VERSIONS = 3  # a run outlives at most KEEP_VERSIONS - 1 later prepares of its dataset


def vocabulary_fingerprint(item_ids: pl.Series) -> str:
    """sha256 over the item IDs in item_idx order: two datasets share it iff their vocabularies agree."""
    h = hashlib.sha256()
    for chunk in item_ids.cast(pl.String).to_list():
        h.update(chunk.encode())
        h.update(b"\x00")
    return h.hexdigest()


def dataset_uri(lake_root: str, name: str, version: str = "") -> str:
    """The dataset's root (where the _meta.json pointer lives), or the folder of one version."""
    root = lake.join(lake_root, "datasets", name)
    return lake.join(root, "versions", version) if version else root


def prepare(raw: RawData, lake_root: str, name: str, protocol: Protocol, overwrite: bool = False) -> dict:
    """Split `raw` with the MultVAE protocol and publish it as a new version of <lake>/datasets/<name>.

    Returns the version's _meta.json."""
    root = dataset_uri(lake_root, name)
    if lake.exists(f"{root}/_meta.json") and not overwrite:
        raise DataError(f"{root} already exists; pass --overwrite to publish a new version of it")
    catalogue = raw.items["item_id"] if raw.items is not None else None
    split = split_multvae(raw.interactions, protocol, source=raw.source, catalogue=catalogue)
    # UTC to the microsecond, so names sort by publication; the random part keeps concurrent writers apart
    version = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"
    uri = dataset_uri(lake_root, name, version)
    with lake.staged_dir(uri) as stage:
        lake.write_parquet(f"{stage}/items/part-0.parquet", _items_table(split, raw.items).to_arrow())
        lake.write_parquet(f"{stage}/users/part-0.parquet", _users_table(split).to_arrow())
        for i, start in enumerate(range(0, max(split.train.height, 1), TRAIN_SHARD_USERS)):
            shard = split.train.slice(start, TRAIN_SHARD_USERS)
            lake.write_parquet(f"{stage}/train/part-{i:05d}.parquet", shard.to_arrow())
        lake.write_parquet(f"{stage}/val/part-0.parquet", split.val.to_arrow())
        lake.write_parquet(f"{stage}/test/part-0.parquet", split.test.to_arrow())
        meta = _meta(split, raw, protocol, name) | {"version": version}
        lake.write_json(f"{stage}/_meta.json", meta)
    lake.write_json(f"{root}/_meta.json", meta)  # the switch: one atomic write (a PUT on S3, a rename locally)
    _prune_versions(root)
    log.info("wrote %s: %d users, %d items", uri, meta["n_users"], meta["n_items"])
    return meta


def _prune_versions(root: str) -> None:
    """Delete all but the newest KEEP_VERSIONS versions (names sort by their UTC time)."""
    fs, path = lake.resolve(f"{root}/versions")
    with lake.explained(root):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        versions = sorted(i.path for i in infos if i.type == pafs.FileType.Directory
                          and not i.base_name.startswith("."))
        for old in versions[:-KEEP_VERSIONS]:
            fs.delete_dir(old)


def _items_table(split: Split, items: pl.DataFrame | None) -> pl.DataFrame:
    """The vocabulary with metadata and each item's training count (the sampler's popularity: streamed
    workers read it here instead of loading every training bag)."""
    n = split.item_ids.len()
    counts = np.bincount(split.train["items"].explode().drop_nulls().to_numpy(), minlength=n)
    vocab = pl.DataFrame({"item_idx": pl.int_range(n, dtype=pl.Int32, eager=True), "item_id": split.item_ids})
    if items is None:
        table = vocab.with_columns(pl.lit(None, pl.String).alias("title"),
                                   pl.lit(None, pl.List(pl.String)).alias("genres"))
    else:
        items = items.with_columns(pl.col("item_id").cast(vocab["item_id"].dtype, strict=False)).unique("item_id")
        table = vocab.join(items, on="item_id", how="left", maintain_order="left")
    return table.with_columns(train_count=pl.Series(counts.astype(np.int64)))


def _users_table(split: Split) -> pl.DataFrame:
    n, h = split.user_ids.len(), split.n_heldout
    labels = ["train"] * split.n_train_users + ["val"] * h + ["test"] * h
    return pl.DataFrame({"user_idx": pl.int_range(n, dtype=pl.Int64, eager=True), "user_id": split.user_ids,
                         "split": labels})


def _meta(split: Split, raw: RawData, protocol: Protocol, name: str) -> dict:
    n_train_inter = int(split.train["items"].list.len().sum())

    def heldout_counts(df: pl.DataFrame) -> dict:
        return {"users": df.height, "foldin": int(df["foldin"].list.len().sum()),
                "heldout": int(df["heldout"].list.len().sum())}

    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "source": raw.source,
        "format": raw.format,
        "protocol": dataclasses.asdict(protocol),
        "n_users": split.user_ids.len(),
        "n_items": split.item_ids.len(),
        "n_interactions_filtered": split.n_interactions,
        "train": {"users": split.train.height, "interactions": n_train_inter},
        "val": heldout_counts(split.val),
        "test": heldout_counts(split.test),
        "has_categories": raw.items is not None,
        "vocabulary_fingerprint": vocabulary_fingerprint(split.item_ids),
    }
