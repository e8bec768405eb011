"""Raw interactions -> a dataset in the lake (layout in docs/architecture.md), on Ray Data.

    <lake>/datasets/<name>/
        _meta.json                   the pointer: the current version's _meta.json (with "version")
        versions/<version>/          one immutable snapshot per prepare, <UTC time to the µs>-<random>
            items/part-0.parquet     item_idx:int32, item_id, title, genres (evaluation only), train_count:int64
            users/part-0.parquet     user_idx:int64, user_id, split
            train/part-*.parquet     user_idx, items: list<int32>          one row per user, 100,000 per shard
            val/, test/              user_idx, foldin, heldout: list<int32>
            _meta.json               counts, protocol, schema version, vocabulary fingerprint, version

The stages (stages.py runs each as parallel tasks; they meet only through files in the lake's scratch):
  read     each input file, streamed in batches: clean, filter, number the rows (pos), partition by user
  group    each user partition: each (user, item) once, users with >= min_user_items, one row per user
  (driver) the users' IDs only: sort, seeded permutation -> user_idx, train/val/test
  assign   each user partition: user_idx; training rows to their output shard; per-item first position
           and count, partitioned by item; held-out users' rows
  items    each item partition: an item's first position and training count over all user partitions
  (driver) the vocabulary (items by first position); the held-out users' 80/20 split, streamed in chunks of
           50,000 users in user-ID order (one generator across the chunks); items and users tables
  write    each output shard of 100,000 training users: item IDs -> item_idx, sorted, one Parquet file

The driver holds the users' IDs and the vocabulary, and of the held-out users' rows one chunk at a time,
never the interactions. A prepare writes a new version folder (staged: a failed prepare leaves nothing a
reader could take as complete), then switches the pointer with one atomic write. Nothing is ever
rewritten in place, so a run that pinned a version at its start reads that version to its last epoch
while `prepare --overwrite` publishes the next one. The newest KEEP_VERSIONS versions are kept; older
ones are deleted. Datasets of schema 1 (tables at the dataset's root, no "version") are still read
as they are.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import math
import uuid

import numpy as np
import polars as pl
import pyarrow.dataset as pds
import pyarrow.fs as pafs

from macrid.data import lake
from macrid.data.layout import KEEP_VERSIONS, dataset_uri, load_meta  # noqa: F401  (KEEP_VERSIONS re-exported)
from macrid.data.by_user import read_by_user
from macrid.data.raw_input import Fragment, Source
from macrid.data.formats import SMALL_FORMATS, RawData, read_item_metadata
from macrid.data.split import (Protocol, foldin_split, group_users, item_firsts, merge_item_firsts, order_users,
                               to_item_idx, vocabulary)
from macrid.names import is_version
from macrid.data.stages import Scratch, Stages, partition_of, read_frame, remove_dead_scratch
from macrid.errors import DataError

log = logging.getLogger(__name__)
SCHEMA_VERSION = 2  # 2: versioned snapshots behind the _meta.json pointer; 1: tables at the dataset's root
TRAIN_SHARD_USERS = 100_000


def vocabulary_fingerprint(item_ids: pl.Series) -> str:
    """sha256 over the item IDs in item_idx order: two datasets share it iff their vocabularies agree."""
    h = hashlib.sha256()
    for chunk in item_ids.cast(pl.String).to_list():
        h.update(chunk.encode())
        h.update(b"\x00")
    return h.hexdigest()


def prepare(raw: RawData | list[Source], lake_root: str, name: str, protocol: Protocol, overwrite: bool = False,
            items: pl.DataFrame | None = None, partitions: int | None = None, runner: str = "local",
            stages: Stages | None = None) -> dict:
    """Split the input with the MultVAE protocol and publish it as a new version of <lake>/datasets/<name>.

    raw: sources to read in parallel (jobs/prepare.py), or interactions already in memory (RawData: tests,
    the synthetic default), which go through the same stages as one input file. items: item metadata
    (item_id, title, genres), e.g. from --items. partitions: user partitions (default: from the input's
    size). runner: "ray" (Ray Data tasks on the cluster) or "local" (this process). Returns _meta.json."""
    root = dataset_uri(lake_root, name)
    pointer = lake.pointer_token(f"{root}/_meta.json")  # what the publication at the end switches from
    if pointer is not None and not overwrite:
        raise DataError(f"{root} already exists; pass --overwrite to publish a new version of it")
    remove_dead_scratch(lake_root, "prepare")  # a killed earlier prepare's intermediate files
    stages = stages or Stages(runner, "prepare")
    stages.require_shared([lake_root] + ([s.uri for s in raw] if not isinstance(raw, RawData) else []))
    scratch = Scratch(lake_root, "prepare")
    try:
        if isinstance(raw, RawData):
            sources, source_name, fmt = _frame_source(raw, scratch), raw.source, raw.format
            items = raw.items if items is None else items
        else:
            sources, fmt = raw, raw[0].format if len(raw) == 1 else "union"
            source_name = " + ".join(s.uri for s in raw)
        return _prepare(sources, source_name, fmt, items, lake_root, name, protocol, partitions, stages, scratch,
                        pointer)
    finally:
        scratch.delete()


def _frame_source(raw: RawData, scratch: Scratch) -> list[Source]:
    df = raw.interactions.select("user_id", "item_id", "rating")
    implicit = df["rating"].null_count() == df.height
    scratch.write(scratch.uri("input", "part-0.parquet"), df.drop("rating") if implicit else df)
    return [Source(scratch.uri("input"), "table", rating_col=None if implicit else "rating")]


def _prepare(sources: list[Source], source_name: str, fmt: str, items: pl.DataFrame | None, lake_root: str,
             name: str, protocol: Protocol, partitions: int | None, stages: Stages, scratch: Scratch,
             pointer: str | None) -> dict:
    frags, P, read = read_by_user(sources, protocol.min_rating, partitions, stages, scratch)
    if items is None:
        items = _small_format_items(sources, frags, read)
    grouped = stages.run("group", _group_task, [
        {"task": p, "min_user_items": protocol.min_user_items, "read": scratch.uri("read", f"p{p:05d}"),
         "out": scratch.uri("group", f"p{p:05d}.parquet")} for p in range(P) if any(p in r["parts"] for r in read)])

    # driver: the users' IDs only
    users_by_part = [(g["task"], scratch.read(scratch.uri("group", f"p{g['task']:05d}.parquet"), ["user_id"]))
                     for g in grouped if g["users"]]
    all_users = pl.concat([u.with_columns(part=pl.lit(p, pl.Int32)) for p, u in users_by_part]) \
        if users_by_part else pl.DataFrame({"user_id": [], "part": []}, schema={"user_id": pl.Int64, "part": pl.Int32})
    ordered, n_train, n_out = order_users(all_users["user_id"], protocol, source_name)
    index = pl.DataFrame({"user_id": ordered, "user_idx": pl.int_range(ordered.len(), dtype=pl.Int64, eager=True)})
    assignment = all_users.join(index, on="user_id", how="left")
    for (p,), part in assignment.partition_by("part", as_dict=True, include_key=False).items():
        scratch.write(scratch.uri("users", f"p{p:05d}.parquet"), part)
    del all_users, assignment
    shards = max(1, math.ceil(n_train / TRAIN_SHARD_USERS))
    assigned = stages.run("assign", _assign_task, [
        {"task": p, "n_train": n_train, "partitions": P, "shard_users": TRAIN_SHARD_USERS,
         "group": scratch.uri("group", f"p{p:05d}.parquet"), "users": scratch.uri("users", f"p{p:05d}.parquet"),
         "scratch": scratch.root} for p, _ in users_by_part])
    firsts = stages.run("items", _items_task, [
        {"task": q, "read": scratch.uri("firsts", f"p{q:05d}"), "out": scratch.uri("vocab", f"p{q:05d}.parquet")}
        for q in range(P) if any(q in a["item_parts"] for a in assigned)])

    # driver: the vocabulary and the held-out users
    vocab = vocabulary(scratch.read(scratch.uri("vocab")), protocol, source_name,
                       catalogue=items["item_id"] if items is not None else None)
    scratch.write(scratch.uri("vocabulary.parquet"), vocab.select("item_id", "item_idx"))
    heldout_ids = index.filter(pl.col("user_idx") >= n_train)  # (2 n_out, 2): IDs only; their rows stay on the lake
    val = _split_heldout(scratch, heldout_ids, vocab, protocol, "val", n_train, n_train + n_out)
    test = _split_heldout(scratch, heldout_ids, vocab, protocol, "test", n_train + n_out, n_train + 2 * n_out)
    del heldout_ids, firsts

    version = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"
    uri = dataset_uri(lake_root, name, version)
    with lake.staged_dir(uri) as stage:
        written = stages.run("write", _write_task, [
            {"task": s, "read": scratch.uri("train", f"p{s:05d}"), "vocabulary": scratch.uri("vocabulary.parquet"),
             "out": lake.join(stage, "train", f"part-{s:05d}.parquet")} for s in range(shards)])
        lake.write_parquet(f"{stage}/items/part-0.parquet", _items_table(vocab, items).to_arrow())
        labels = pl.Series(["train"] * n_train + ["val"] * n_out + ["test"] * n_out)
        lake.write_parquet(f"{stage}/users/part-0.parquet", index.select("user_idx", "user_id").with_columns(split=labels).to_arrow())
        for split, parts in (("val", val), ("test", test)):
            for r, part in enumerate(parts):  # each part sorted by user_idx, the parts in user_idx order
                lake.write_parquet(f"{stage}/{split}/part-{r:05d}.parquet", read_frame(part).to_arrow())
        counts = _sum(read, ("rows", "ratings_missing", "below_min_rating", "kept"))
        meta = {
            "schema_version": SCHEMA_VERSION, "name": name, "source": source_name, "format": fmt,
            "protocol": dataclasses.asdict(protocol),
            "n_users": ordered.len(), "n_items": vocab.height,
            "n_interactions_filtered": sum(g["interactions"] for g in grouped),
            "input": {"files": len(frags), "partitions": P, **counts},
            "train": {"users": n_train, "interactions": sum(w["interactions"] for w in written)},
            "val": _heldout_counts(val), "test": _heldout_counts(test),
            "has_categories": items is not None,
            "vocabulary_fingerprint": vocabulary_fingerprint(vocab["item_id"]),
            "version": version,
        }
        lake.write_json(f"{stage}/_meta.json", meta)
    try:  # the switch: one atomic write, and only from the version this job started from
        lake.switch_pointer(f"{dataset_uri(lake_root, name)}/_meta.json", meta, pointer)
    except lake.PointerMoved:
        _remove_version(uri)
        now = load_meta(lake_root, name).get("version", "?")
        raise DataError(f"{dataset_uri(lake_root, name)}: another prepare of {name!r} published version {now} while "
                        f"this one ran; this one's version was not published (and is removed). Run one prepare of "
                        f"a dataset at a time; to publish this input on top of {now}, run it again with --overwrite"
                        ) from None
    _prune_versions(dataset_uri(lake_root, name))
    log.info("wrote %s: %d users, %d items (%d input rows, %d without a rating dropped)", uri, meta["n_users"],
             meta["n_items"], counts["rows"], counts["ratings_missing"])
    return meta


# ---- the tasks (run on Ray Data's workers; every argument and result is JSON) ----

def _group_task(spec: dict) -> dict:
    """One user partition -> one row per kept user (user_id, items, pos)."""
    rows = read_frame(spec["read"])
    grouped = group_users(rows, spec["min_user_items"])
    if grouped.height:
        lake.write_parquet(spec["out"], grouped.to_arrow(), scratch=True)
    return {"users": grouped.height, "interactions": int(grouped["items"].list.len().sum() or 0)}


def _assign_task(spec: dict) -> dict:
    """One user partition with its user_idx -> training rows by output shard, item firsts by item
    partition, held-out users' rows."""
    s = spec["scratch"]
    users = read_frame(spec["users"])
    rows = read_frame(spec["group"]).join(users, on="user_id", how="inner")
    train = rows.filter(pl.col("user_idx") < spec["n_train"])
    firsts = item_firsts(train)
    firsts = firsts.with_columns(part=partition_of(firsts["item_id"], spec["partitions"]))
    item_parts = set()
    for (q,), part in firsts.partition_by("part", as_dict=True, include_key=False).items():
        lake.write_parquet(lake.join(s, "firsts", f"p{q:05d}", f"{spec['task']:06d}.parquet"), part.to_arrow(), scratch=True)
        item_parts.add(int(q))
    train = train.select("user_idx", "items").with_columns(shard=(pl.col("user_idx") // spec["shard_users"]))
    for (k,), part in train.partition_by("shard", as_dict=True, include_key=False).items():
        lake.write_parquet(lake.join(s, "train", f"p{k:05d}", f"{spec['task']:06d}.parquet"), part.to_arrow(), scratch=True)
    heldout = rows.filter(pl.col("user_idx") >= spec["n_train"]).select("user_id", "user_idx", "items")
    if heldout.height:
        lake.write_parquet(lake.join(s, "heldout", f"{spec['task']:06d}.parquet"), heldout.to_arrow(), scratch=True)
    return {"item_parts": sorted(item_parts)}


def _items_task(spec: dict) -> dict:
    """One item partition: each item's first position and training count over every user partition."""
    merged = merge_item_firsts(read_frame(spec["read"]))
    lake.write_parquet(spec["out"], merged.to_arrow(), scratch=True)
    return {"items": merged.height}


def _write_task(spec: dict) -> dict:
    """One output shard: its training users' item IDs -> item_idx, sorted by user_idx, one Parquet file."""
    rows = read_frame(spec["read"])
    vocab = read_frame(spec["vocabulary"])
    train = to_item_idx(rows, vocab).sort("user_idx")
    lake.write_parquet(spec["out"], train.to_arrow())
    return {"users": train.height, "interactions": int(train["items"].list.len().sum() or 0)}


# ---- the driver's small pieces ----

def _small_format_items(sources: list[Source], frags: list[Fragment], read: list[dict]) -> pl.DataFrame | None:
    """The item metadata (titles, genres) of MovieLens/Netflix inputs, read on the driver (O(items))."""
    parts = []
    for f in frags:
        if f.kind not in SMALL_FORMATS:
            return None
        meta = read_item_metadata(f.uri, f.kind)
        if meta is None:
            return None
        parts.append(meta.with_columns(item_id=f.prefix + pl.col("item_id").cast(pl.String)) if f.prefix else meta)
    return pl.concat(parts) if parts else None


def _items_table(vocab: pl.DataFrame, items: pl.DataFrame | None) -> pl.DataFrame:
    """The vocabulary with metadata and each item's training count (the sampler's popularity: streamed
    workers read it here instead of loading every training bag)."""
    table = vocab.select("item_idx", "item_id")
    if items is None:
        table = table.with_columns(pl.lit(None, pl.String).alias("title"),
                                   pl.lit(None, pl.List(pl.String)).alias("genres"))
    else:
        items = items.with_columns(pl.col("item_id").cast(table["item_id"].dtype, strict=False)).unique("item_id")
        table = table.join(items.select("item_id", "title", "genres"), on="item_id", how="left",
                           maintain_order="left")
    return table.with_columns(train_count=vocab["train_count"])


HELDOUT_CHUNK_USERS = 50_000  # held-out users the driver splits at once; the split's parts hold this many each


def _split_heldout(scratch: Scratch, heldout_ids: pl.DataFrame, vocab: pl.DataFrame, protocol: Protocol, split: str,
                   lo: int, hi: int) -> list[str]:
    """The fold-in split of the users with user_idx in [lo, hi), with the driver's memory bounded by a chunk.

    The draws must be those of one RandomState over all the split's users in user-ID order (the reference), so
    the users are taken in consecutive user-ID chunks, each read from the scratch by its ID range and split with
    the generator where the previous chunk left it. Each chunk's rows go to user_idx-range buckets; each bucket
    is then sorted alone. Returns the buckets' sorted files, in user_idx order (the split's part files)."""
    ids = heldout_ids.filter((pl.col("user_idx") >= lo) & (pl.col("user_idx") < hi)).sort("user_id")["user_id"]
    rng = np.random.RandomState(protocol.seed)
    buckets = max(1, math.ceil((hi - lo) / HELDOUT_CHUNK_USERS))
    for c, start in enumerate(range(0, ids.len(), HELDOUT_CHUNK_USERS)):
        first, last = ids[start], ids[min(start + HELDOUT_CHUNK_USERS, ids.len()) - 1]
        rows = read_frame(scratch.uri("heldout"), filters=(pds.field("user_idx") >= lo) & (pds.field("user_idx") < hi)
                          & (pds.field("user_id") >= first) & (pds.field("user_id") <= last))
        part = foldin_split(rows, vocab, protocol, rng).with_columns(
            bucket=((pl.col("user_idx") - lo) // HELDOUT_CHUNK_USERS).cast(pl.Int32))
        scratch.write_partitions(f"split-{split}", c, part, "bucket", buckets)
        del rows, part
    parts = []
    for r in range(buckets):
        rows = read_frame(scratch.uri(f"split-{split}", f"p{r:05d}"))
        if rows is None:
            continue
        uri = scratch.uri(f"split-{split}-sorted", f"part-{r:05d}.parquet")
        scratch.write(uri, rows.sort("user_idx"))
        parts.append(uri)
    if not parts:  # every user of the split lost all their items to the vocabulary: an empty split, as before
        uri = scratch.uri(f"split-{split}-sorted", "part-00000.parquet")
        scratch.write(uri, pl.DataFrame(schema={"user_idx": pl.Int64, "foldin": pl.List(pl.Int32),
                                                "heldout": pl.List(pl.Int32)}))
        parts.append(uri)
    return parts


def _heldout_counts(parts: list[str]) -> dict:
    counts = {"users": 0, "foldin": 0, "heldout": 0}
    for part in parts:
        df = read_frame(part)
        counts["users"] += df.height
        counts["foldin"] += int(df["foldin"].list.len().sum() or 0)
        counts["heldout"] += int(df["heldout"].list.len().sum() or 0)
    return counts


def _sum(results: list[dict], keys: tuple[str, ...]) -> dict:
    return {k: sum(r[k] for r in results) for k in keys}


def _remove_version(uri: str) -> None:
    """A version folder that was written but lost the race to be published: nobody can point at it."""
    fs, path = lake.resolve(uri)
    with lake.explained(uri):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)  # on S3 also the folder's marker object


def _prune_versions(root: str) -> None:
    """Delete all but the newest KEEP_VERSIONS versions (names sort by their UTC time). Only folders named
    as prepare names its versions are touched: anything else under versions/ is not ours to delete."""
    fs, path = lake.resolve(f"{root}/versions")
    with lake.explained(root):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        versions = sorted(i.path for i in infos if i.type == pafs.FileType.Directory and is_version(i.base_name))
        for old in versions[:-KEEP_VERSIONS]:
            fs.delete_dir(old)
