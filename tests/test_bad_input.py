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


# --- by category (issue 30, 10): environment errors, damaged lake records, arguments checked before Ray ---

def _job(name):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_damaged_json_records_of_the_lake_are_named(synthetic_lake, tmp_path, capsys):
    """A truncated _meta.json (a dataset's pointer) and a run.json (a run's record): exit 2, the file named."""
    import shutil

    lake = tmp_path / "lake"
    shutil.copytree(synthetic_lake, lake)
    meta = lake / "datasets" / "synthetic" / "_meta.json"
    meta.write_text(meta.read_text()[:40])
    assert _job("train")(["--lake", str(lake), "--in-process", "--set", "optim.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert "_meta.json: damaged JSON record" in err and "re-run the job" in err and "Traceback" not in err

    shutil.rmtree(lake)
    shutil.copytree(synthetic_lake, lake)
    args = ["--lake", str(lake), "--in-process", "--set", "optim.epochs=1", "--set", "model.D=8",
            "--set", "run.name='r'", "--set", "run.progress=false"]
    assert _job("train")(args) == 0
    (lake / "runs" / "r" / "run.json").write_bytes(b"\xff\xfe{")
    assert _job("train")(args + ["--resume"]) == 2
    assert "run.json: damaged JSON record" in capsys.readouterr().err


def test_a_folder_for_a_file_a_file_for_a_folder_and_another_encoding_are_named(tmp_path, capsys):
    train = _job("train")
    assert train(["--config", str(tmp_path), "--print-config"]) == 2
    assert f"{tmp_path}" in capsys.readouterr().err
    latin = tmp_path / "latin.toml"
    latin.write_bytes("# réglages\n[optim]\nepochs = 2\n".encode("latin-1"))
    assert train(["--config", str(latin), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "latin.toml: not UTF-8" in err and "iconv" in err
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert _job("generate")(["--out", str(blocker / "raw"), "--users", "50", "--items", "30"]) == 2
    err = capsys.readouterr().err
    assert "afile" in err and "is a file, not a folder" in err and "Traceback" not in err


@pytest.mark.parametrize("errno_,words", [(28, "disk is full"), (30, "read-only"), (13, "no permission"),
                                          (21, "it is a folder")])
def test_environment_errors_become_what_to_do(errno_, words):
    from macrid.errors import EnvironmentProblem, user_error

    problem = user_error(OSError(errno_, os.strerror(errno_), "/lake/datasets/x/part-0.parquet"))
    assert isinstance(problem, EnvironmentProblem)
    assert str(problem).startswith("/lake/datasets/x/part-0.parquet: ") and words in str(problem)
    assert user_error(ValueError("a bug")) is None  # a fault of the program keeps its traceback


def test_sweep_arguments_are_checked_before_ray_starts_and_take_no_name(tmp_path, capsys):
    import ray

    from conftest import ROOT

    for flag in ("--samples", "--concurrent"):
        assert _job("tune")(["--config", str(ROOT / "configs" / "ml-100k.toml"), "--lake", str(tmp_path / "lake"),
                             flag, "0", "--name", "typo"]) == 2
        assert f"{flag} 0 must be at least 1" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "lake" / "runs" / "typo").exists()


def test_a_duplicated_csv_column_is_refused(tmp_path):
    from macrid.data.raw_input import Source

    folder = tmp_path / "events"
    folder.mkdir()
    (folder / "a.csv").write_text("uid,uid,item_id\n1,2,3\n4,5,6\n")
    with pytest.raises(DataError, match=r"a\.csv: column\(s\) \['uid'\] appear more than once"):
        prepare([Source(str(folder), user_col="uid")], str(tmp_path / "lake"), "d", Protocol(), runner="local")
    assert not (tmp_path / "lake" / "datasets" / "d").exists()


def test_a_held_out_share_that_leaves_one_user_per_split_is_refused(tmp_path):
    rows = [(u, i) for u in range(15) for i in range(6)]
    raw = pl.DataFrame({"user_id": [u for u, _ in rows], "item_id": [i for _, i in rows]})
    f = tmp_path / "events.parquet"
    raw.write_parquet(f)
    with pytest.raises(DataError, match=r"--heldout 0\.1 of 15 users gives only 1 validation and 1 test"):
        prepare(read_raw(f), str(tmp_path / "lake"), "d", Protocol(min_rating=None))
    prepare(read_raw(f), str(tmp_path / "lake"), "d", Protocol(min_rating=None, heldout=2))  # a count is asked for


def test_every_option_an_error_advises_exists(tmp_path, capsys):
    """generate's "already exists; pass --overwrite" advises a flag the job has."""
    generate = _job("generate")
    out = str(tmp_path / "raw")
    assert generate(["--out", out, "--users", "60", "--items", "40"]) == 0
    assert generate(["--out", out, "--users", "60", "--items", "40"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert generate(["--out", out, "--users", "60", "--items", "40", "--overwrite"]) == 0


def test_resume_of_a_run_that_never_existed_is_refused(tmp_path, capsys):
    """--resume of a misspelled or missing run: exit 2 with the path, nothing written; `--resume if-any` (a retried
    RayJob's first attempt) starts it."""
    args = ["--lake", str(tmp_path / "lake"), "--in-process", "--set", "run.name='nightly'", "--set",
            "optim.epochs=1", "--set", "model.D=8", "--set", "run.progress=false"]
    assert _job("train")(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "runs/nightly: no run to resume there" in err and "--resume if-any" in err
    assert not (tmp_path / "lake" / "runs").exists()
    assert _job("train")(args + ["--resume", "if-any"]) == 0
    assert _job("train")(args + ["--set", "optim.epochs=2", "--resume"]) == 0  # now it exists: continued
