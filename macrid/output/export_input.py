"""The export's input: every user's latest items, as user rows `(user_id | user_idx, items: list<int32>)`.

Two sources:
- a prepared dataset of the lake (`--input NAME`): all its users, train and held-out (fold-in and
  held-out items together), read by Ray Data shard by shard; its vocabulary must be the run's;
- raw shards in any format `prepare` reads (`--input PATH_OR_URI`): item IDs are mapped through the
  run's vocabulary (unknown items counted and dropped, users left with no known item counted and
  reported), ratings below the dataset's `min_rating` and rows without a rating (NaN or null, when
  the input has a rating column) dropped, as in training, then grouped into user rows written as
  Parquet shards (one per user partition) to a staging folder that Ray Data reads.

Both stream with bounded memory: the raw path goes through prepare's read stage (by_user.py) and
one task per user partition, so the driver never holds the interactions.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from macrid.data import lake, layout
from macrid.data.batches import load_meta, snapshot_uri
from macrid.errors import CheckpointError, DataError
from macrid.data.layout import dataset_uri
from macrid.data.by_user import read_by_user
from macrid.data.raw_input import Source as RawSource
from macrid.data.stages import Scratch, Stages, read_frame


@dataclass
class Source:
    files: dict[str, list[str]]  # "bags" (user_idx | user_id, items) and/or "heldout" (user_idx, foldin, heldout)
    users_uri: str | None  # the dataset's users table when rows carry user_idx
    record: dict  # what was read, for the commit metadata
    counts: dict  # users_input, users_without_known_items, interactions_dropped, items_unknown
    user_type: pa.DataType  # of user_id


def is_dataset(lake_root: str, name: str) -> bool:
    return layout.is_dataset(lake_root, name)


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


def raw(uri: str, vocabulary: pl.DataFrame, min_rating: float | None, stage: str, lake_root: str,
        fmt: str = "auto", user_col: str = "user_id", item_col: str = "item_id", rating_col: str | None = None,
        runner: str = "ray") -> Source:
    """Raw interactions -> staged user rows in the run's item indices. vocabulary: item_idx, item_id.

    The rows go through prepare's read stage (parallel, partitioned by user) and one task per user
    partition maps them through the vocabulary and writes `<stage>/part-<partition>.parquet`; the driver
    holds the vocabulary and the distinct unknown item IDs, never the interactions."""
    stages = Stages(runner, "export-input")
    stages.require_shared([uri, stage])
    scratch = Scratch(lake_root, "export-input")  # <lake>/_scratch/export-input-<id>/
    try:
        _, P, read = read_by_user([RawSource(uri, fmt, user_col, item_col, rating_col)], min_rating, None,
                                  stages, scratch)
        if sum(r["kept"] for r in read) == 0:
            raise DataError(f"{uri}: holds no interactions; check --input (an empty export would look like a "
                            "night with no users)")
        scratch.write(scratch.uri("vocabulary.parquet"), vocabulary.select("item_id", "item_idx"))
        bags = stages.run("bags", _bags_task, [
            {"task": p, "uri": uri, "item_col": item_col, "read": scratch.uri("read", f"p{p:05d}"),
             "vocabulary": scratch.uri("vocabulary.parquet"), "out": lake.join(stage, f"part-{p:05d}.parquet"),
             "unknown": scratch.uri("unknown", f"p{p:05d}.parquet")}
            for p in range(P) if any(p in r["parts"] for r in read)])
        unknown = scratch.read(scratch.uri("unknown"))
        items_unknown = unknown["item_id"].n_unique() if unknown is not None else 0
    finally:
        scratch.delete()
    total = {k: sum(b[k] for b in bags) for k in ("users_input", "users_with_known_items", "interactions_dropped")}
    interactions = sum(r["kept"] for r in read)
    if total["interactions_dropped"] == interactions:
        example = unknown["item_id"][0] if unknown is not None and unknown.height else None
        raise DataError(
            f"{uri}: none of its {items_unknown:,} item IDs (e.g. {example!r}) is in the "
            f"run's vocabulary ({vocabulary.height:,} items, e.g. {vocabulary['item_id'][0]!r}); check --item-col "
            "and that this is the catalogue the run was trained on")
    counts = {"users_input": total["users_input"], "interactions_input": interactions,
              "users_without_known_items": total["users_input"] - total["users_with_known_items"],
              "interactions_dropped": total["interactions_dropped"], "items_unknown": items_unknown,
              "ratings_missing": sum(r["ratings_missing"] for r in read)}
    files = lake.list_parquet(stage)
    fs, _ = lake.resolve(stage)
    user_type = pq.read_schema(files[0], filesystem=fs).field("user_id").type
    return Source({"bags": files}, None, {"uri": uri, "interactions": interactions}, counts, user_type)


def _bags_task(spec: dict) -> dict:
    """One user partition -> (user_id, items: the user's known item_idx, unique and sorted), sorted by user."""
    rows = read_frame(spec["read"], ["user_id", "item_id"])
    vocab = read_frame(spec["vocabulary"])
    rows = rows.with_columns(item_id=_as_vocabulary_ids(rows["item_id"], vocab["item_id"], spec["uri"],
                                                        spec["item_col"]))
    known = rows.join(vocab, on="item_id", how="left")
    unknown = known.filter(pl.col("item_idx").is_null())
    bags = (known.filter(pl.col("item_idx").is_not_null())
            .group_by("user_id").agg(pl.col("item_idx").unique().sort().alias("items"))
            .sort("user_id"))
    if bags.height:
        lake.write_parquet(spec["out"], bags.to_arrow())
    if unknown.height:
        lake.write_parquet(spec["unknown"], unknown.select(pl.col("item_id").unique()).to_arrow(), scratch=True)
    return {"users_input": rows["user_id"].n_unique(), "users_with_known_items": bags.height,
            "interactions_dropped": unknown.height}


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
