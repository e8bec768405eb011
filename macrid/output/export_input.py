"""The export's input: every user's latest items, as user rows `(user_id | user_idx, items: list<int32>)`.

Two sources:
- a prepared dataset of the lake (`--input NAME`): all its users, train and held-out (fold-in and
  held-out items together), read by Ray Data shard by shard; its vocabulary must be the run's;
- raw shards in any format `prepare` reads (`--input PATH_OR_URI`): item IDs are mapped through the
  run's vocabulary (unknown items counted and dropped, users left with no known item counted and
  reported), ratings below the dataset's `min_rating` dropped, as training did, then grouped into
  user rows written as Parquet shards to a staging folder that Ray Data reads.

The raw path groups interactions in memory with polars on the driver (as `prepare` does); a lake of
prepared datasets streams with bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from macrid.data import lake
from macrid.data.batches import load_meta, snapshot_uri
from macrid.errors import CheckpointError, DataError
from macrid.data.prepare import dataset_uri
from macrid.data.readers import read_raw

STAGE_USERS = 100_000  # users per staged shard of a raw input


@dataclass
class Source:
    files: dict[str, list[str]]  # "bags" (user_idx | user_id, items) and/or "heldout" (user_idx, foldin, heldout)
    users_uri: str | None  # the dataset's users table when rows carry user_idx
    record: dict  # what was read, for the commit metadata
    counts: dict  # users_input, users_without_known_items, interactions_dropped, items_unknown
    user_type: pa.DataType  # of user_id


def is_dataset(lake_root: str, name: str) -> bool:
    return "/" not in name and lake.exists(f"{dataset_uri(lake_root, name)}/_meta.json")


def prepared(lake_root: str, name: str, fingerprint: str) -> Source:
    meta = load_meta(lake_root, name)
    if meta["vocabulary_fingerprint"] != fingerprint:
        raise CheckpointError(
            f"{dataset_uri(lake_root, name)}: dataset {name!r} has item vocabulary "
            f"{meta['vocabulary_fingerprint'][:12]}, but the run's checkpoint was trained on {fingerprint[:12]}; "
            "export the run with the dataset it was trained on (or its raw interactions), or retrain")
    snap = snapshot_uri(lake_root, name)
    files = {"bags": lake.list_parquet(f"{snap}/train"),
             "heldout": lake.list_parquet(f"{snap}/val") + lake.list_parquet(f"{snap}/test")}
    users = meta["train"]["users"] + meta["val"]["users"] + meta["test"]["users"]
    interactions = meta["train"]["interactions"] + sum(meta[s]["foldin"] + meta[s]["heldout"] for s in ("val", "test"))
    fs, _ = lake.resolve(snap)
    user_type = pq.read_schema(lake.list_parquet(f"{snap}/users")[0], filesystem=fs).field("user_id").type
    return Source(files, f"{snap}/users", {"dataset": name, "version": meta.get("version", "")},
                  {"users_input": users, "interactions_input": interactions, "users_without_known_items": 0,
                   "interactions_dropped": 0, "items_unknown": 0}, user_type)


def raw(uri: str, vocabulary: pl.DataFrame, min_rating: float | None, stage: str, fmt: str = "auto",
        user_col: str = "user_id", item_col: str = "item_id", rating_col: str | None = None) -> Source:
    """Raw interactions -> staged user rows in the run's item indices. vocabulary: item_idx, item_id."""
    data = read_raw(uri, fmt, user_col, item_col, rating_col).interactions  # user_id, item_id, rating
    if data.height == 0:
        raise DataError(f"{uri}: holds no interactions; check --input (an empty export would look like a "
                        "night with no users)")
    data = data.with_columns(item_id=_as_vocabulary_ids(data["item_id"], vocabulary["item_id"], uri, item_col))
    if min_rating is not None:
        data = data.filter(pl.col("rating").is_null() | (pl.col("rating") >= min_rating))
    users_in = data["user_id"].n_unique()
    known = data.join(vocabulary, on="item_id", how="left")
    unknown = known.filter(pl.col("item_idx").is_null())
    if unknown.height == data.height:
        raise DataError(
            f"{uri}: none of its {data['item_id'].n_unique():,} item IDs (e.g. {data['item_id'][0]!r}) is in the "
            f"run's vocabulary ({vocabulary.height:,} items, e.g. {vocabulary['item_id'][0]!r}); check --item-col "
            "and that this is the catalogue the run was trained on")
    bags = (known.filter(pl.col("item_idx").is_not_null())
            .group_by("user_id").agg(pl.col("item_idx").unique().sort().alias("items"))
            .sort("user_id"))
    for start in range(0, bags.height, STAGE_USERS):
        lake.write_parquet(lake.join(stage, f"part-{start // STAGE_USERS:05d}.parquet"),
                           bags.slice(start, STAGE_USERS).to_arrow())
    counts = {"users_input": users_in, "interactions_input": data.height,
              "users_without_known_items": users_in - bags.height,
              "interactions_dropped": unknown.height, "items_unknown": unknown["item_id"].n_unique()}
    return Source({"bags": lake.list_parquet(stage)}, None, {"uri": uri, "interactions": data.height}, counts,
                  bags.to_arrow().schema.field("user_id").type)


def _as_vocabulary_ids(ids: pl.Series, vocabulary: pl.Series, uri: str, col: str) -> pl.Series:
    """The input's item IDs in the vocabulary's type, or an error naming the column and a bad value."""
    if ids.dtype == vocabulary.dtype:
        return ids
    cast = ids.cast(vocabulary.dtype, strict=False)
    bad = cast.is_null() & ids.is_not_null()
    if bad.any():
        value = ids[int(bad.arg_max())]
        raise DataError(f"{uri}: column {col!r} holds {value!r}, but the run's item IDs are {vocabulary.dtype} "
                        f"(e.g. {vocabulary[0]!r}); pass the right --item-col or fix the column's type")
    return cast


def merge_heldout(batch: pa.Table) -> pa.Table:
    """Held-out rows (user_idx, foldin, heldout) -> (user_idx, items): the user's whole bag."""
    df = pl.from_arrow(batch)
    return df.select("user_idx", items=pl.concat_list("foldin", "heldout").list.sort()).to_arrow()
