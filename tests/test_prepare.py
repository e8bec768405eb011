"""Lake-scale prepare (issue 21): the distributed stages write exactly the tables of the in-memory
MultVAE protocol (frozen in tests/reference/protocol.py, the expectation), whatever the number of
partitions, the runner or the order the files were written in; object-storage input is read in
place; a skewed user completes; bad shards are named and publish nothing."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest

from conftest import real_data
from macrid.data import lake
from macrid.data.batches import snapshot_uri
from macrid.data.prepare import prepare
from macrid.data.raw_input import Source
from macrid.data.readers import read_raw
from macrid.data.split import Protocol
from macrid.data.stages import Stages
from macrid.errors import DataError
from reference.protocol import tables as reference_tables

TABLES = ("items", "users", "train", "val", "test")


def written(lake_root: str, name: str) -> dict[str, pl.DataFrame]:
    snap = snapshot_uri(lake_root, name)
    return {t: pl.from_arrow(lake.read_table(f"{snap}/{t}")) for t in TABLES}


def assert_same_tables(got: dict, ref: dict) -> None:
    for t in TABLES:
        assert got[t].schema == ref[t].schema, t
        assert got[t].equals(ref[t]), f"table {t} differs from the in-memory protocol's"


def assert_nothing_published(lake_root: str, name: str) -> None:
    assert not lake.exists(f"{lake_root}/datasets/{name}/_meta.json")
    fs, path = lake.resolve(f"{lake_root}/_scratch")
    import pyarrow.fs as pafs

    left = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    assert not [i for i in left if i.type == pafs.FileType.File], "the job's scratch files were left behind"


@pytest.fixture(scope="module")
def ml1m():
    raw = read_raw(real_data("ml-1m"))
    return raw.interactions, raw.items


@pytest.fixture(scope="module")
def ml1m_shards(ml1m, tmp_path_factory):
    """ml-1m as 5 Parquet shards: 4 slices in input order plus a fifth that repeats rows of the first (so
    (user, item) pairs recur across files), written last-name-first so the folder lists them in another
    order than their names. The reference reads the shards' concatenation in name order."""
    inter, _ = ml1m
    folder = tmp_path_factory.mktemp("raw") / "ratings"
    folder.mkdir()
    n = inter.height
    bounds = np.linspace(0, n, 5).astype(int)
    shards = [inter.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(4)]
    shards.append(inter.slice(0, 20_000).with_columns(rating=pl.lit(5.0)))  # repeats, rated 5
    for i in reversed(range(5)):
        shards[i].write_parquet(folder / f"part-{i:02d}.parquet")
    return str(folder), pl.concat(shards)


@pytest.mark.parametrize("partitions,runner,seed,chunk", [(1, "local", 98765, 50_000), (3, "ray", 98765, 50_000),
                                                           (8, "local", 98765, 97), (3, "local", 1, 250)])
def test_identical_to_the_in_memory_protocol_on_ml1m(request, ml1m, ml1m_shards, tmp_path, partitions, runner,
                                                     seed, chunk, monkeypatch):
    """chunk: held-out users split at once. 97 and 250 stream each 604-user split in 7 and 3 chunks of user IDs
    (one generator across them) and 7 and 3 sorted parts: the tables are still the reference's, row for row."""
    if runner == "ray":
        request.getfixturevalue("ray_cluster")
    import macrid.data.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "HELDOUT_CHUNK_USERS", chunk)
    folder, concatenated = ml1m_shards
    _, items = ml1m
    protocol = Protocol(seed=seed)
    ref = reference_tables(concatenated, items, protocol)
    stages = Stages(runner, "prepare")
    meta = prepare([Source(folder, rating_col="rating")], str(tmp_path), "ml-1m", protocol, items=items,
                   partitions=partitions, stages=stages)
    assert_same_tables(written(str(tmp_path), "ml-1m"), ref)
    assert len(lake.list_parquet(f"{snapshot_uri(str(tmp_path), 'ml-1m')}/val")) == -(-604 // chunk)
    assert meta["n_interactions_filtered"] == ref["n_interactions"]
    assert meta["input"] == meta["input"] | {"files": 5, "partitions": partitions, "rows": concatenated.height,
                                             "ratings_missing": 0}
    if runner == "ray":
        assert stages.stats and "Map(prepare:read)" in stages.stats[0]


def test_the_union_of_two_sources_matches_the_reference(tmp_path):
    """--input gowalla --input amazon-book-kgat: IDs prefixed by the folder, sources in order."""
    from reference.protocol import union

    names = ("gowalla", "amazon-book-kgat")
    parts = [read_raw(real_data(n)) for n in names]
    inter, items = union([(p.interactions, p.items) for p in parts], list(names))
    protocol = Protocol(heldout=5000)
    ref = reference_tables(inter, items, protocol)
    prepare([Source(str(real_data(n)), prefix=f"{n}:") for n in names], str(tmp_path), "u", protocol, partitions=4)
    assert_same_tables(written(str(tmp_path), "u"), ref)


def test_s3_input_is_read_in_place(s3_endpoint, tmp_path, monkeypatch):
    """Shards on the S3 server are streamed from it: nothing downloads them to local disk first."""
    rng = np.random.default_rng(3)
    frames = [pl.DataFrame({"uid": rng.integers(0, 300, 4000), "sku": rng.integers(0, 500, 4000),
                            "stars": rng.integers(1, 6, 4000).astype(float)}) for _ in range(3)]
    for i, f in enumerate(frames):
        lake.write_parquet(f"s3://lake/raw-in-place/events/part-{i}.parquet", f.to_arrow())

    def no_download(*args, **kwargs):
        raise AssertionError("the input was copied to local disk")

    assert not hasattr(lake, "download")  # the lake module has no way left to copy input down
    import pyarrow.fs as pafs

    monkeypatch.setattr(pafs, "copy_files", no_download)
    from macrid.data.readers import read_items

    titles = pl.DataFrame({"sku": np.arange(500), "title": [f"item {i}" for i in range(500)],
                           "genres": [[f"g{i % 3}"] for i in range(500)]})
    lake.write_parquet("s3://lake/raw-in-place/items/part-0.parquet", titles.to_arrow())
    items = read_items("s3://lake/raw-in-place/items", item_col="sku")  # the item table, also read in place
    protocol = Protocol(heldout=20)
    meta = prepare([Source("s3://lake/raw-in-place/events", user_col="uid", item_col="sku", rating_col="stars")],
                   "s3://lake/in-place", "events", protocol, partitions=3, items=items)
    ref = reference_tables(pl.concat(frames).rename({"uid": "user_id", "sku": "item_id", "stars": "rating"}),
                           titles.rename({"sku": "item_id"}), protocol)
    assert_same_tables(written("s3://lake/in-place", "events"), ref)
    assert meta["input"]["files"] == 3
    assert_nothing_published("s3://lake/in-place", "never")  # and the scratch folder is gone


def test_a_user_with_1e5_items_completes_in_a_skewed_partition(tmp_path):
    rng = np.random.default_rng(0)
    heavy = pl.DataFrame({"user_id": np.zeros(100_000, dtype=np.int64),
                          "item_id": rng.permutation(200_000)[:100_000].astype(np.int64)})
    light = pl.DataFrame({"user_id": rng.integers(1, 400, 8000), "item_id": rng.integers(0, 3000, 8000)})
    inter = pl.concat([light.slice(0, 4000), heavy, light.slice(4000)]).with_columns(rating=pl.lit(None, pl.Float64))
    (tmp_path / "raw").mkdir()
    inter.drop("rating").write_parquet(tmp_path / "raw" / "part-0.parquet")
    protocol = Protocol(heldout=30, min_rating=None)
    prepare([Source(str(tmp_path / "raw"))], str(tmp_path / "lake"), "skew", protocol, partitions=4)
    got = written(str(tmp_path / "lake"), "skew")
    assert_same_tables(got, reference_tables(inter, None, protocol))
    heavy_idx = got["users"].filter(pl.col("user_id") == 0)["user_idx"][0]
    rows = pl.concat([got["train"].rename({"items": "all"}),
                      got["val"].select("user_idx", all=pl.concat_list("foldin", "heldout")),
                      got["test"].select("user_idx", all=pl.concat_list("foldin", "heldout"))])
    assert rows.filter(pl.col("user_idx") == heavy_idx)["all"].list.len()[0] == 100_000


def test_nan_and_null_ratings_are_dropped_and_counted_never_positives(tmp_path):
    rng = np.random.default_rng(1)
    n = 6000
    df = pl.DataFrame({"user_id": rng.integers(0, 200, n), "item_id": rng.integers(0, 400, n),
                       "rating": rng.integers(1, 6, n).astype(float)})
    missing = rng.choice(n, 700, replace=False)
    ratings = df["rating"].to_numpy().copy()
    ratings[missing[:500]] = np.nan
    df = df.with_columns(rating=pl.Series(ratings)).with_columns(
        rating=pl.when(pl.int_range(n).is_in(missing[500:].tolist())).then(None).otherwise(pl.col("rating")))
    (tmp_path / "raw").mkdir()
    df.write_parquet(tmp_path / "raw" / "part-0.parquet")
    protocol = Protocol(heldout=15)
    meta = prepare([Source(str(tmp_path / "raw"), rating_col="rating")], str(tmp_path / "lake"), "nan", protocol)
    assert meta["input"]["ratings_missing"] == 700
    assert meta["input"]["below_min_rating"] == int(((ratings < 4) & ~np.isnan(ratings)).sum()
                                                    - (ratings[missing[500:]] < 4).sum())
    clean = df.filter(pl.col("rating").is_not_null() & ~pl.col("rating").is_nan())
    assert_same_tables(written(str(tmp_path / "lake"), "nan"), reference_tables(clean, None, protocol))


def test_an_empty_shard_is_counted_and_changes_nothing(tmp_path):
    rng = np.random.default_rng(2)
    df = pl.DataFrame({"user_id": rng.integers(0, 150, 3000), "item_id": rng.integers(0, 300, 3000)})
    (tmp_path / "raw").mkdir()
    df.write_parquet(tmp_path / "raw" / "part-0.parquet")
    df.head(0).write_parquet(tmp_path / "raw" / "part-1.parquet")
    (tmp_path / "raw" / "part-2.csv").write_text("user_id,item_id\n")
    (tmp_path / "raw" / "part-3.parquet").write_bytes(b"")  # a 0-byte file: an upload that wrote nothing
    protocol = Protocol(heldout=10, min_rating=None)
    meta = prepare([Source(str(tmp_path / "raw"))], str(tmp_path / "lake"), "e", protocol, partitions=2)
    assert meta["input"]["files"] == 4 and meta["input"]["rows"] == 3000
    ref = reference_tables(df.with_columns(rating=pl.lit(None, pl.Float64)), None, protocol)
    assert_same_tables(written(str(tmp_path / "lake"), "e"), ref)


def _shards(tmp_path, case: str) -> tuple[str, str]:
    """A folder of good shards plus one bad one; returns (folder, the bad shard's file name)."""
    folder = tmp_path / "raw"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for i in range(3):
        good = pl.DataFrame({"user_id": rng.integers(0, 100, 2000), "item_id": rng.integers(0, 200, 2000)})
        if case == "csv text rating":
            good = good.with_columns(rating=pl.lit(5.0))
        good.write_parquet(folder / f"part-{i}.parquet")
    bad = "part-3.parquet"
    if case == "corrupt":
        (folder / bad).write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")
    elif case == "truncated":
        good = (folder / "part-0.parquet").read_bytes()
        (folder / bad).write_bytes(good[: len(good) // 2])
    elif case == "string ids":
        pl.DataFrame({"user_id": ["a", "b"], "item_id": [1, 2]}).write_parquet(folder / bad)
    elif case == "missing column":
        pl.DataFrame({"user": [1, 2], "item_id": [1, 2]}).write_parquet(folder / bad)
    elif case == "float ids":
        pl.DataFrame({"user_id": [1.5, 2.0], "item_id": [1, 2]}).write_parquet(folder / bad)
    elif case == "list ids":
        pl.DataFrame({"user_id": [[1], [2]], "item_id": [1, 2]}).write_parquet(folder / bad)
    elif case == "null ids":
        pl.DataFrame({"user_id": [1, None], "item_id": [1, 2]}).write_parquet(folder / bad)
    elif case == "uint64 ids":
        pl.DataFrame({"user_id": pl.Series([2**63 + 5, 1], dtype=pl.UInt64), "item_id": [1, 2]}).write_parquet(
            folder / bad)
    elif case == "csv text rating":
        bad = "part-3.csv"
        (folder / bad).write_text("user_id,item_id,rating\n1,2,5\n3,4,great\n")
    return str(folder), bad


@pytest.mark.parametrize("case,words", [
    ("corrupt", ["cannot be read as parquet"]),
    ("truncated", ["cannot be read as parquet"]),
    ("string ids", ["different schemas", "part-0.parquet"]),
    ("missing column", ["missing column", "'user_id'"]),
    ("float ids", ["'user_id' has type Float64", "integers or strings"]),
    ("list ids", ["'user_id' has type List", "integers or strings"]),
    ("null ids", ["'user_id' has 1 null", "row 1"]),
    ("uint64 ids", ["above the int64 range", "strings"]),
    ("csv text rating", ["'rating' is not numeric", "row 1", "'great'"]),
])
def test_a_bad_shard_is_named_and_nothing_is_published(tmp_path, case, words):
    folder, bad = _shards(tmp_path, case)
    rating = "rating" if case == "csv text rating" else None
    with pytest.raises(DataError) as err:
        prepare([Source(folder, rating_col=rating)], str(tmp_path / "lake"), "bad", Protocol(heldout=5),
                partitions=3)
    message = str(err.value)
    assert bad in message, message
    for w in words:
        assert w in message, message
    assert_nothing_published(str(tmp_path / "lake"), "bad")


def test_a_bad_shard_on_ray_names_the_file(ray_cluster, tmp_path):
    """The error crosses from a Ray Data task to the driver with the file's name, not a traceback."""
    folder, bad = _shards(tmp_path, "corrupt")
    with pytest.raises(DataError, match=rf"{bad}: cannot be read as parquet"):
        prepare([Source(folder)], str(tmp_path / "lake"), "bad", Protocol(heldout=5), partitions=2, runner="ray")
    assert_nothing_published(str(tmp_path / "lake"), "bad")


def test_the_job_runs_on_ray_and_reports_its_counts(tmp_path):
    """jobs/prepare.py end to end: it starts its own local Ray, and prints what it read and dropped."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    folder, _ = _shards(tmp_path, "none")
    env = os.environ | {"RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "prepare.py"), "--input", folder, "--lake",
                           str(tmp_path / "lake"), "--name", "job", "--heldout", "5", "--partitions", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout[done.stdout.index("{"):])
    assert out["input"] == out["input"] | {"files": 3, "rows": 6000, "partitions": 2}
    assert "Traceback" not in done.stderr


def test_a_delta_table_is_read_at_its_current_version(tmp_path):
    """A Delta table as input: the files of its latest version, in name order; an overwritten version's
    files, still on disk, are not read."""
    from deltalake import write_deltalake

    rng = np.random.default_rng(6)

    def frame(lo: int) -> pl.DataFrame:
        return pl.DataFrame({"user_id": rng.integers(lo, lo + 100, 3000), "item_id": rng.integers(0, 250, 3000)})

    table = str(tmp_path / "events")
    old, new1, new2 = frame(0), frame(1000), frame(2000)
    write_deltalake(table, old.to_arrow())
    write_deltalake(table, new1.to_arrow(), mode="overwrite")
    write_deltalake(table, new2.to_arrow(), mode="append")
    files = sorted(f for f in os.listdir(table) if f.endswith(".parquet"))
    assert len(files) == 3  # the overwritten version's file is still there
    current = [pl.read_parquet(os.path.join(table, f)) for f in files]
    current = [f for f in current if f["user_id"].min() >= 1000]  # which file holds which frame: by its users
    protocol = Protocol(heldout=10, min_rating=None)
    meta = prepare([Source(table)], str(tmp_path / "lake"), "delta", protocol, partitions=2)
    ref = reference_tables(pl.concat(current).with_columns(rating=pl.lit(None, pl.Float64)), None, protocol)
    assert meta["input"]["files"] == 2
    assert_same_tables(written(str(tmp_path / "lake"), "delta"), ref)


def test_a_single_file_format_on_s3_is_refused_with_what_to_do(s3_endpoint, tmp_path):
    """MovieLens/Netflix/adjacency files are parsed whole from local disk; on S3 they are refused before any
    task runs, rather than copied down."""
    lake.write_bytes("s3://lake/raw-ml/u.data", b"1\t2\t5\t0\n")
    for fmt in ("ml-100k", "netflix"):
        with pytest.raises(DataError, match=rf"s3://lake/raw-ml: the {fmt} format is read from local disk only.*"
                                            "Parquet or CSV"):
            prepare([Source("s3://lake/raw-ml", fmt)], str(tmp_path / "lake"), "ml", Protocol())
    assert_nothing_published(str(tmp_path / "lake"), "ml")


def test_a_delta_table_on_s3_is_partitioned_by_its_real_file_sizes(s3_endpoint):
    """Every file's size comes from the table's log (get_add_actions), the same as the object's on S3; a size of 1
    per file made any Delta table on S3 one partition."""
    import boto3
    from deltalake import write_deltalake

    from macrid.data.raw_input import fragments
    from macrid.data.lake import delta_storage_options as storage_options

    uri = "s3://lake/delta-input/events"
    rng = np.random.default_rng(8)
    for i in range(3):
        frame = pl.DataFrame({"user_id": rng.integers(0, 500, 20000 * (i + 1)), "item_id": rng.integers(0, 900, 20000 * (i + 1))})
        write_deltalake(uri, frame.to_arrow(), mode="append", storage_options=storage_options(uri))
    frags = fragments([Source(uri)])
    s3 = boto3.client("s3")
    real = {f"s3://lake/{o['Key']}": o["Size"] for o in s3.list_objects_v2(Bucket="lake", Prefix="delta-input/events/")
            ["Contents"] if o["Key"].endswith(".parquet")}
    assert {f.uri: f.size for f in frags} == real and len(set(real.values())) == 3


def test_a_delta_table_with_deletion_vectors_is_refused(tmp_path):
    """A version that deletes rows through a deletion vector (written here into the log by hand, as Spark and
    Databricks write it): its files still hold the deleted rows, so reading them would resurrect them."""
    import json as jsonlib

    from deltalake import write_deltalake

    from macrid.data.raw_input import fragments

    table = tmp_path / "events"
    write_deltalake(str(table), pl.DataFrame({"user_id": [1, 2, 3], "item_id": [4, 5, 6]}).to_arrow())
    name = next(f for f in os.listdir(table) if f.endswith(".parquet"))
    size = os.path.getsize(table / name)
    entries = [
        {"protocol": {"minReaderVersion": 3, "minWriterVersion": 7, "readerFeatures": ["deletionVectors"],
                      "writerFeatures": ["deletionVectors"]}},
        {"remove": {"path": name, "deletionTimestamp": 1, "dataChange": True}},
        {"add": {"path": name, "size": size, "partitionValues": {}, "modificationTime": 1, "dataChange": True,
                 "deletionVector": {"storageType": "i", "pathOrInlineDv": "wi5b=000010000siXQKl0rr91000f55c8Xg0@@D72lkbi5=-{L",
                                    "sizeInBytes": 40, "cardinality": 1}}},
    ]
    (table / "_delta_log" / "00000000000000000001.json").write_text("\n".join(jsonlib.dumps(e) for e in entries) + "\n")
    with pytest.raises(DataError, match="deletion vectors"):
        fragments([Source(str(table))])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_two_prepares_of_one_name_only_one_publishes(where, tmp_path, s3_endpoint, monkeypatch):
    """Prepare A reads the pointer (none yet), prepare B publishes meanwhile, then A would switch the pointer:
    A is refused with the cause (the conditional PUT on S3, the lock and compare locally), its version folder is
    removed, and B's version stays current. Before, both exited 0 and the last switch won."""
    import pyarrow.fs as pafs

    from macrid.data import prepare as prepare_module
    from macrid.data.layout import load_meta

    root = str(tmp_path / "lake") if where == "local" else f"s3://lake/race-{os.getpid()}"
    rng = np.random.default_rng(9)
    raw = lambda: read_raw_frame(rng)  # noqa: E731
    b = prepare(raw(), root, "d", Protocol(heldout=5, min_rating=None))  # B, published while A ran
    monkeypatch.setattr(prepare_module.lake, "pointer_token", lambda uri: None)  # A read the pointer before B
    with pytest.raises(DataError, match=r"another prepare of 'd' published version .* while this one ran.*--overwrite"):
        prepare(raw(), root, "d", Protocol(heldout=5, min_rating=None))
    monkeypatch.undo()
    assert load_meta(root, "d")["version"] == b["version"]
    fs, path = lake.resolve(f"{root}/datasets/d/versions")
    versions = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.Directory]
    assert versions == [b["version"]]  # A's unpublished version is gone


def read_raw_frame(rng):
    from macrid.data.formats import RawData

    df = pl.DataFrame({"user_id": rng.integers(0, 60, 900), "item_id": rng.integers(0, 80, 900),
                       "rating": pl.Series([None] * 900, dtype=pl.Float64)})
    return RawData(df, None, "test", "table")


def test_a_killed_prepares_scratch_folder_is_removed_by_the_next(tmp_path):
    """A prepare SIGKILLed mid-run leaves <lake>/_scratch/prepare-<id>/; the next prepare removes it (its owner's
    process is gone) and leaves a running job's alone."""
    import json as jsonlib
    import socket
    import subprocess

    lake_root = tmp_path / "lake"
    dead = subprocess.Popen(["true"])
    dead.wait()
    for name, pid in (("prepare-deadbeef0000", dead.pid), ("prepare-a11ve0000000", os.getpid())):
        folder = lake_root / "_scratch" / name
        (folder / "read").mkdir(parents=True)
        (folder / "read" / "x.parquet").write_bytes(b"0" * 1000)
        (folder / "_owner.json").write_text(jsonlib.dumps({"host": socket.gethostname(), "pid": pid, "started": 0}))
    prepare(read_raw_frame(np.random.default_rng(3)), str(lake_root), "d", Protocol(heldout=5, min_rating=None))
    assert sorted(os.listdir(lake_root / "_scratch")) == ["prepare-a11ve0000000"]
