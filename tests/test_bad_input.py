"""Bad input gets a clear error naming the file and the column, and leaves nothing half-written."""

import gzip
import os

import polars as pl
import pytest

from macrid.config import load_config
from macrid.errors import CheckpointError, ConfigError, DataError
from macrid.data.prepare import prepare
from macrid.data.readers import read_raw
from macrid.data.split import Protocol


def test_missing_column(tmp_path):
    f = tmp_path / "events.parquet"
    pl.DataFrame({"uid": [1, 2], "sku": [3, 4]}).write_parquet(f)
    with pytest.raises(DataError, match=r"events\.parquet.*missing column.*'item_id'"):
        read_raw(f, user_col="uid")


def test_non_numeric_rating(tmp_path):
    f = tmp_path / "events.csv"
    f.write_text("uid,sku,stars\n1,3,5\n2,4,five\n")
    with pytest.raises(DataError, match=r"events\.csv.*'stars' is not numeric.*row 1.*'five'"):
        read_raw(f, user_col="uid", item_col="sku", rating_col="stars")


def test_non_numeric_field_in_movielens_file(tmp_path):
    f = tmp_path / "ratings.dat.gz"
    with gzip.open(f, "wt") as g:
        g.write("1::10::5\n1::eleven::4\n")
    with pytest.raises(DataError, match=r"ratings\.dat\.gz.*'item_id' at line 2.*'eleven'"):
        read_raw(f)


def test_null_id(tmp_path):
    f = tmp_path / "events.parquet"
    pl.DataFrame({"user_id": [1, None], "item_id": [3, 4]}).write_parquet(f)
    with pytest.raises(DataError, match=r"events\.parquet.*'user_id' has 1 null"):
        read_raw(f)


def test_empty_after_filtering_names_the_file(tmp_path):
    f = tmp_path / "events.csv"
    f.write_text("user_id,item_id,rating\n1,3,2\n2,4,1\n")
    raw = read_raw(f, rating_col="rating")
    with pytest.raises(DataError, match=r"events\.csv: no interactions left"):
        prepare(raw, str(tmp_path / "lake"), "x", Protocol())
    assert not (tmp_path / "lake" / "datasets" / "x").exists()
    leftovers = list((tmp_path / "lake" / "datasets").iterdir()) if (tmp_path / "lake" / "datasets").exists() else []
    assert leftovers == []  # the staging folder is gone too


def test_unknown_format(tmp_path):
    f = tmp_path / "interactions.xlsx"
    f.write_text("x")
    with pytest.raises(DataError, match=r"interactions\.xlsx.*--format"):
        read_raw(f)


def test_corrupt_parquet(tmp_path):
    f = tmp_path / "events.parquet"
    f.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"events\.parquet: cannot be read"):
        read_raw(f)


def test_missing_input_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_raw(tmp_path / "nope.csv")


def test_config_typo_and_type_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"model\.K=.*should be int"):
        load_config(None, ["model.K=2.5"])
    f = tmp_path / "c.toml"
    f.write_text("[modle]\nK = 3\n")
    with pytest.raises(ConfigError, match=r"c\.toml: unknown section.*modle"):
        load_config(f)


def test_dataset_without_meta_is_refused(tmp_path):
    from macrid.data.batches import load_dataset

    os.makedirs(tmp_path / "datasets" / "half" / "train")
    with pytest.raises(DataError, match="no _meta.json"):
        load_dataset(str(tmp_path), "half")


def test_checkpoint_from_another_vocabulary_is_refused(tmp_path):
    from macrid.training import checkpoint
    from macrid.model.vae import MacridVAE

    path = str(tmp_path / "c.pt")
    checkpoint.save(path, model=MacridVAE(5, K=2, D=3), optimizer=None, step=0, epoch=0, config={}, n_items=5,
                    fingerprint="a" * 64)
    assert checkpoint.load(path, "a" * 64)["n_items"] == 5
    with pytest.raises(CheckpointError, match="item vocabulary aaaaaaaaaaaa.*bbbbbbbbbbbb"):
        checkpoint.load(path, "b" * 64)


def test_sampled_softmax_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="macridvae only"):
        load_config(None, ["model.name='multvae'", "optim.candidates='user'", "optim.negatives=10"])
    with pytest.raises(ConfigError, match="row_sparse=false"):
        load_config(None, ["optim.negatives=10", "optim.weight_decay=0.01"])
    with pytest.raises(ConfigError, match="'batch' or 'user'"):
        load_config(None, ["optim.candidates='all'"])


class _RunsCode:
    """What a tampered checkpoint carries: unpickling it would create a file (or do anything else)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_tampered_checkpoint_is_refused_and_runs_nothing(tmp_path):
    import io

    import torch

    from macrid.training import checkpoint
    from macrid.model.vae import MacridVAE

    marker = tmp_path / "pwned"
    path = tmp_path / "latest.pt"
    good = checkpoint.to_bytes(model=MacridVAE(5, K=2, D=3), step=0, epoch=0, config={}, n_items=5,
                               fingerprint="a" * 64)
    state = torch.load(io.BytesIO(good), weights_only=True)
    state["extra"] = {"payload": _RunsCode(str(marker))}
    buf = io.BytesIO()
    torch.save(state, buf)
    path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match=f"{path}: not a macrid checkpoint that can be loaded safely"):
        checkpoint.load(str(path), "a" * 64)
    assert not marker.exists(), "unpickling ran the payload"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="loaded safely"):
        checkpoint.load(str(path))
