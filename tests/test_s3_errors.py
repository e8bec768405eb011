"""Object-storage failures get errors that name the cause: endpoint, credentials, bucket, incomplete dataset."""

import os
import socket
import subprocess
import sys
import time

import pytest

from macrid.data import lake
from macrid.data.batches import load_dataset
from macrid.errors import DataError


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wrong_endpoint(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MACRID_S3_RETRIES", "1")
    with pytest.raises(DataError, match="cannot reach the S3 endpoint"):
        lake.check_root("s3://lake/x")


def test_missing_bucket(s3_endpoint):
    with pytest.raises(DataError, match="bucket 'no-such-bucket' does not exist"):
        lake.check_root("s3://no-such-bucket/lake")


def test_dataset_without_meta_on_s3(s3_endpoint):
    import pyarrow as pa

    lake.write_parquet("s3://lake/half/datasets/d/train/part-0.parquet", pa.table({"items": [[1, 2]]}))
    with pytest.raises(DataError, match="no _meta.json"):
        load_dataset("s3://lake/half", "d")


def test_missing_prefix_is_a_clear_error(s3_endpoint):
    with pytest.raises(DataError, match="no _meta.json"):
        load_dataset("s3://lake/nothing-here", "d")


def test_bad_credentials(tmp_path, monkeypatch):
    """moto with authentication on rejects keys it never issued, as AWS does."""
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTISSUED")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        monkeypatch.setenv("MACRID_S3_RETRIES", "1")
        with pytest.raises(DataError, match="access denied; check AWS_ACCESS_KEY_ID"):
            lake.check_root("s3://lake/x")
    finally:
        server.terminate()
        server.wait()


def test_prepare_reads_raw_shards_from_s3_and_names_the_uri(s3_endpoint, tmp_path):
    import polars as pl

    from macrid.data.prepare import prepare
    from macrid.data.readers import read_raw
    from macrid.data.split import Protocol

    rows = [(u, i, 5.0) for u in range(40) for i in range(u % 7, u % 7 + 12)]
    df = pl.DataFrame(rows, schema={"uid": pl.Int64, "sku": pl.Int64, "stars": pl.Float64}, orient="row")
    for part in range(2):
        lake.write_parquet(f"s3://lake/raw/events/part-{part}.parquet", df[part::2].to_arrow())
    raw = read_raw("s3://lake/raw/events", user_col="uid", item_col="sku", rating_col="stars")
    assert raw.interactions.height == len(rows) and raw.source == "s3://lake/raw/events"
    meta = prepare(raw, "s3://lake/prepared", "events", Protocol(heldout=4))
    assert meta["n_users"] == 40 and lake.exists("s3://lake/prepared/datasets/events/_meta.json")
    with pytest.raises(DataError, match=r"s3://lake/raw/events/part-0\.parquet: missing column"):
        read_raw("s3://lake/raw/events", user_col="user")


def test_s3_publication_is_all_or_nothing(s3_endpoint):
    import pyarrow as pa

    uri = "s3://lake/atomic/datasets/d"
    with lake.staged_dir(uri) as stage:
        lake.write_parquet(f"{stage}/train/part-0.parquet", pa.table({"items": [[1]]}))
        lake.write_json(f"{stage}/_meta.json", {"version": 1})
    with pytest.raises(DataError, match="already exists"):
        with lake.staged_dir(uri):
            pass
    with pytest.raises(RuntimeError, match="crash"):  # a job dying halfway through an overwrite
        with lake.staged_dir(uri, overwrite=True) as stage:
            lake.write_parquet(f"{stage}/train/part-0.parquet", pa.table({"items": [[2]]}))
            raise RuntimeError("crash")
    assert not lake.exists(f"{uri}/_meta.json")  # never taken for complete
    assert not lake.list_parquet(f"{uri}/train")  # and the half-written files are gone
