"""Hardening (issue 24): names stay inside the lake at every entry point, on disk and on S3; credentials
never appear in messages; bad values get an error that names them; metrics endpoints take a host and
survive a taken port."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import urllib.request

import pytest

from conftest import ROOT

BAD_NAMES = ["../../x", "..", "", "a/b", ".hidden", "x$y", "a..b"]


def job(name: str):
    """jobs/<name>.py as a module, so its main(argv) runs in this process."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry_points(lake: str, bad: str, raw: str) -> list[tuple[str, list[str]]]:
    return [
        ("prepare", ["--local", "--input", raw, "--lake", lake, "--name", bad]),
        ("train", ["--lake", lake, "--in-process", "--set", f"run.name={bad!r}"]),
        ("train", ["--lake", lake, "--in-process", "--set", f"data.dataset={bad!r}"]),
        ("baselines", ["--lake", lake, "--dataset", bad]),
        ("tune", ["--config", str(ROOT / "configs" / "synthetic.toml"), "--lake", lake, "--name", bad, "--samples", "1"]),
        ("export", ["--lake", lake, "--run", "r", "--input", "d", "--name", bad]),
        ("export", ["--lake", lake, "--run", bad, "--input", "d", "--name", "nightly"]),
        ("explain", ["--lake", lake, "--run", bad, "report"]),
        ("explain", ["--lake", lake, "--export", bad, "steer", "--user", "1"]),
    ]


def files_under(root: str) -> set[str]:
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}


@pytest.fixture(scope="module")
def raw_csv(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("raw") / "events.csv"
    path.write_text("user_id,item_id\n" + "".join(f"{u},{i}\n" for u in range(30) for i in range(u % 5, u % 5 + 8)))
    return str(path)


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_names_are_refused_at_every_entry_point_on_disk(tmp_path, capsys, raw_csv, bad):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the lake's")
    lake = tmp_path / "outside" / "a" / "lake"
    before = files_under(str(tmp_path))
    for name, argv in entry_points(str(lake), bad, raw_csv):
        if bad == "" and f"run.name={bad!r}" in argv:
            continue  # an empty run.name is the documented default: <dataset>-<model>-<time>
        rc = job(name).main(argv)
        err = capsys.readouterr().err
        assert rc == 2, (name, argv, err)
        assert "is not allowed" in err and repr(bad) in err, (name, argv, err)
        assert "Traceback" not in err
    assert files_under(str(tmp_path)) == before, "a refused name wrote files"


@pytest.mark.parametrize("bad", ["../x", ".."])
def test_bad_names_are_refused_on_s3(s3_endpoint, capsys, raw_csv, bad):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)

    def keys() -> set[str]:
        return {o["Key"] for o in s3.list_objects_v2(Bucket="lake").get("Contents", [])}

    before = keys()
    for name, argv in entry_points("s3://lake/hardening", bad, raw_csv):
        rc = job(name).main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and "is not allowed" in err, (name, argv, err)
    assert keys() == before


def test_prune_touches_only_version_folders(tmp_path):
    """Old versions are deleted by their name pattern: a foreign folder under versions/ is left alone."""
    import polars as pl

    from macrid.data.prepare import KEEP_VERSIONS, prepare
    from macrid.data.formats import RawData
    from macrid.data.split import Protocol

    df = pl.DataFrame({"user_id": [u for u in range(40) for _ in range(6)],
                       "item_id": [(u + i) % 30 for u in range(40) for i in range(6)],
                       "rating": [None] * 240}, schema_overrides={"rating": pl.Float64})
    lake = str(tmp_path / "lake")
    foreign = tmp_path / "lake" / "datasets" / "d" / "versions" / "0000-not-a-version"
    for i in range(KEEP_VERSIONS + 2):
        prepare(RawData(df, None, "t", "table"), lake, "d", Protocol(heldout=3), overwrite=i > 0)
        if i == 0:
            foreign.mkdir()
            (foreign / "data.txt").write_text("someone else's")
    versions = sorted(p.name for p in foreign.parent.iterdir())
    assert "0000-not-a-version" in versions and (foreign / "data.txt").exists()
    assert len(versions) == KEEP_VERSIONS + 1


def test_credentials_in_endpoints_are_redacted(tmp_path, monkeypatch, capsys, raw_csv):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://keyid:SECRET-AWS-7f3a@127.0.0.1:{port}")
    monkeypatch.setenv("MACRID_S3_RETRIES", "1")
    rc = job("prepare").main(["--local", "--input", raw_csv, "--lake", "s3://lake/x", "--name", "d"])
    err = capsys.readouterr().err
    assert rc == 2 and "keyid:***@127.0.0.1" in err and "SECRET-AWS-7f3a" not in err
    export = job("export")
    export._push(f"http://u:SECRET-PG-91c2@127.0.0.1:{port}", "nightly", None, 1.0)
    err = capsys.readouterr().err
    assert "u:***@127.0.0.1" in err and "SECRET-PG-91c2" not in err


BAD_CONFIG = [
    ("optim.lr=nan", "optim.lr=nan"), ("optim.lr=inf", "optim.lr=inf"), ("optim.lr=0", "optim.lr=0"),
    ("model.tau=nan", "model.tau"), ("model.sigma0=inf", "model.sigma0"), ("model.sigma0=-1", "model.sigma0"),
    ("optim.beta=-1", "optim.beta=-1"), ("optim.ema=2.0", "optim.ema=2.0"), ("optim.ema=-0.5", "optim.ema=-0.5"),
    ("run.eval_every=0", "run.eval_every=0"), ("run.eval_users=-1", "run.eval_users=-1"),
    ("run.threads=-1", "run.threads=-1"), ("run.metrics_port=-5", "run.metrics_port=-5"),
    ("run.metrics_port=70000", "run.metrics_port=70000"), ("run.metrics_port=80", "privileged"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"), ("optim.anneal_epochs=nan", "optim.anneal_epochs"),
    ("run.memory_budget_gb=0", "run.memory_budget_gb"), ("run.patience=-2", "run.patience"),
    ("model.dropout=1.0", "model.dropout"), ("model.K=0", "model.K"), ("run.max_failures=-1", "run.max_failures"),
    ('data.version="latest"', "dataset version 'latest'"), ("optim.proposal_alpha=-1", "optim.proposal_alpha"),
]

SPACE = "[model]\nK = {choice = [\"seven\"]}\n"  # a search-space value of the wrong type

# (job, arguments, words the error must hold). {lake}: a lake folder that must stay unwritten; {raw}: a good raw
# CSV; {space}: a search space with a wrong-typed value. Every case exits 2, says what is wrong, and writes nothing.
BAD_INPUTS = [
    *[("train", ["--lake", "{lake}", "--in-process", "--set", o], w) for o, w in BAD_CONFIG],
    ("train", ["--lake", "{lake}", "--in-process", "--set", "optim.nonsense=1"], "optim.nonsense"),
    ("train", ["--lake", "{lake}", "--in-process", "--set", "optim.lr"], "optim.lr"),
    ("train", ["--lake", "{lake}", "--in-process", "--set", "optim.epochs='ten'"], "optim.epochs"),
    ("prepare", ["--local", "--input", "{raw}", "--lake", "{lake}", "--name", "d", "--heldout", "nan"], "--heldout nan"),
    ("prepare", ["--local", "--input", "{raw}", "--lake", "{lake}", "--name", "d", "--heldout", "-3"], "--heldout -3"),
    ("prepare", ["--local", "--input", "{raw}", "--lake", "{lake}", "--name", "d", "--min-user-items", "0"],
     "--min-user-items 0"),
    ("prepare", ["--local", "--input", "{raw}", "--lake", "{lake}", "--name", "d", "--min-rating", "inf"],
     "--min-rating inf"),
    ("prepare", ["--local", "--input", "{raw}", "--lake", "{lake}", "--name", "d", "--partitions", "0"],
     "--partitions 0"),
    ("prepare", ["--local", "--input", "{raw}.missing", "--lake", "{lake}", "--name", "d"], ".missing"),
    ("generate", ["--out", "{lake}", "--users", "0"], "n_users=0"),
    ("generate", ["--out", "{lake}", "--users", "100", "--items", "50", "--K", "0"], "K=0"),
    ("generate", ["--out", "{lake}", "--users", "100", "--items", "50", "--chunk-users", "0"], "--chunk-users 0"),
    ("generate", ["--out", "{lake}", "--users", "100", "--items", "3", "--K", "5"], "K=5 categories"),
    ("generate", ["--out", "{lake}", "--users", "100", "--items", "50", "--mean-items", "nan"], "mean_items=nan"),
    ("explain", ["--lake", "{lake}", "--run", "r", "steer", "--user", "1", "--top-n", "-5"], "--top-n -5"),
    ("explain", ["--lake", "{lake}", "--run", "r", "steer", "--user", "1", "--top-n", "0"], "--top-n 0"),
    ("explain", ["--lake", "{lake}", "--run", "r", "traverse", "--item", "1", "--dim", "0", "--beam", "0"], "--beam 0"),
    ("explain", ["--lake", "{lake}", "--run", "r", "traverse", "--item", "1", "--dim", "0", "--steps", "0"],
     "--steps 0"),
    ("explain", ["--lake", "{lake}", "--run", "r", "traverse", "--item", "1", "--dim", "0", "--gamma", "nan"],
     "--gamma nan"),
    *[("explain", ["--lake", "{lake}", "--run", "r", "steer", "--user", "1", "--weight", w],
       "a concept's weight is a finite number") for w in ("0=nan", "0=-1", "0=inf")],
    ("explain", ["--lake", "{lake}", "--run", "r", "report"], "no model.pt"),
    ("export", ["--lake", "{lake}", "--run", "r", "--input", "d", "--name", "n", "--top-n", "-1"], "--top-n"),
    ("export", ["--lake", "{lake}", "--run", "r", "--input", "d", "--name", "n", "--top-n", str(2**31)],
     f"--top-n {2**31}"),
    ("export", ["--lake", "{lake}", "--run", "r", "--input", "d", "--name", "n", "--date", "2026-13-01"],
     "--date '2026-13-01'"),
    ("export", ["--lake", "{lake}", "--run", "r", "--input", "d", "--name", "n", "--workers", "0"], "--workers"),
    ("export", ["--lake", "{lake}", "--run", "r", "--input", "d", "--name", "n"], "r"),
    ("tune", ["--config", str(ROOT / "configs" / "synthetic.toml"), "--lake", "{lake}", "--space", "{space}",
              "--samples", "1"], "seven"),
    ("tune", ["--config", str(ROOT / "configs" / "synthetic.toml"), "--lake", "{lake}", "--name", "s", "--resume",
              "--samples", "1"], "no sweep to resume"),
    ("tune", ["--config", "{lake}/missing.toml", "--samples", "1"], "missing.toml"),
]


@pytest.mark.parametrize("name,argv,words", BAD_INPUTS,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_INPUTS)])
def test_every_bad_input_is_named_and_writes_nothing(tmp_path, capsys, raw_csv, name, argv, words):
    (tmp_path / "space.toml").write_text(SPACE)
    fill = {"{lake}": str(tmp_path / "lake"), "{raw}": raw_csv, "{space}": str(tmp_path / "space.toml")}
    argv = [next((a.replace(k, v) for k, v in fill.items() if k in a), a) for a in argv]
    before = files_under(str(tmp_path))
    rc = job(name).main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert words in err and "Traceback" not in err, err
    assert files_under(str(tmp_path)) == before and not (tmp_path / "lake").exists(), "a refused input wrote files"


def test_the_bad_input_table_holds_at_least_50_cases():
    assert len(BAD_INPUTS) >= 50 and {n for n, _, _ in BAD_INPUTS} >= {"prepare", "train", "tune", "export",
                                                                        "explain", "generate"}


def test_metrics_take_a_host_and_move_off_a_taken_port():
    from macrid.errors import ConfigError
    from macrid.training.telemetry import TrainMetrics

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        metrics = TrainMetrics(port, "r", rank=0, host="127.0.0.1")
        try:
            assert metrics.port != port
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=5).read().decode()
            assert 'macrid_train_steps_total{rank="0",run="r"}' in body
        finally:
            metrics.close()
    with pytest.raises(ConfigError, match="metrics_host='192.0.2.1'"):
        TrainMetrics(port, "r", rank=0, host="192.0.2.1")  # TEST-NET-1: never an address of this machine


def test_a_checkpoint_declaring_a_huge_catalogue_is_refused_before_allocating(tmp_path):
    """n_items = 10^11 in model.pt (3.2 TB of item table) is refused: no tensor of the file has that size."""
    from macrid.config import Config
    from macrid.errors import CheckpointError
    from macrid.model.vae import build_model
    from macrid.training import checkpoint
    from macrid.training.checkpoint import load_model

    cfg = Config()
    model = build_model(cfg.model, 50)
    run = tmp_path / "run"
    payload = {"model": model, "step": 0, "epoch": 0, "config": cfg.to_dict(), "n_items": 10**11, "fingerprint": "f"}
    checkpoint.save(str(run / "model.pt"), **payload)
    with pytest.raises(CheckpointError, match=r"n_items=100000000000"):
        load_model(str(run))
    checkpoint.save(str(run / "model.pt"), **(payload | {"n_items": 50}))
    assert load_model(str(run))[0].h.shape == (50, cfg.model.D)  # the honest file loads


def test_sweep_state_signatures_bind_name_sweep_content_and_key_in_one_write(tmp_path, monkeypatch):
    """Signed through the filesystem Tune is given; any change of byte, name or key is refused; pickled, the
    filesystem carries no key; the key file is made once, readable by its owner only."""
    import hashlib
    import hmac
    import pickle

    import pyarrow.fs as pafs

    from macrid.errors import ConfigError
    from macrid.training.signed_state import signing_filesystem, state_key, verify_experiment

    monkeypatch.delenv("MACRID_STATE_KEY", raising=False)
    monkeypatch.setenv("MACRID_STATE_KEY_FILE", str(tmp_path / "keys" / "state.key"))
    key = state_key()
    assert key == state_key() and oct(os.stat(tmp_path / "keys" / "state.key").st_mode & 0o777) == "0o600"
    exp = str(tmp_path / "runs" / "my-sweep" / "ray")
    fs = signing_filesystem(pafs.LocalFileSystem(), exp, key)
    fs.create_dir(exp)
    with fs.open_output_stream(f"{exp}/tuner.pkl") as f:
        f.write(b"state")
    stored = open(f"{exp}/tuner.pkl", "rb").read()
    assert os.listdir(exp) == ["tuner.pkl"]  # one file: data and signature in the same write, no temporary left
    head, _, data = stored.partition(b"\n")
    assert data == b"state" and head.startswith(b"MACRID-SIGNED-1 ")
    # restated: HMAC-SHA256(key, name NUL sweep NUL sha256(content))
    assert json.loads(head.split(b" ", 1)[1])["hmac"] == hmac.new(
        key, b"tuner.pkl\0my-sweep\0" + hashlib.sha256(b"state").digest(), "sha256").hexdigest()
    assert verify_experiment(pafs.LocalFileSystem(), exp, key) == ["tuner.pkl"]
    assert b"state" == fs.open_input_file(f"{exp}/tuner.pkl").read()  # Tune reads its own bytes back
    assert key not in pickle.dumps(fs) and pickle.loads(pickle.dumps(fs)).handler.key is None
    with pytest.raises(ConfigError, match="does not match"):
        verify_experiment(pafs.LocalFileSystem(), exp, b"another key")
    other = tmp_path / "runs" / "other-sweep" / "ray"  # a signed file copied from another sweep of the same key
    other.mkdir(parents=True)
    open(other / "tuner.pkl", "wb").write(stored)
    with pytest.raises(ConfigError, match="tuner.pkl.*does not match its content, name or sweep"):
        verify_experiment(pafs.LocalFileSystem(), str(other), key)
    open(f"{exp}/trainable.pkl", "wb").write(stored)  # a signed file copied to another name
    with pytest.raises(ConfigError, match="trainable.pkl.*does not match"):
        verify_experiment(pafs.LocalFileSystem(), exp, key)
    os.remove(f"{exp}/trainable.pkl")
    fs.move(f"{exp}/tuner.pkl", f"{exp}/trainable.pkl")  # Tune's own rename is re-signed under the new name
    assert verify_experiment(pafs.LocalFileSystem(), exp, key) == ["trainable.pkl"]
    open(f"{exp}/tuner.pkl", "wb").write(b"state")  # data without a signature
    with pytest.raises(ConfigError, match="tuner.pkl.*carries no signature"):
        fs.open_input_file(f"{exp}/tuner.pkl")
