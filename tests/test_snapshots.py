"""Dataset versions: prepare publishes immutable snapshots behind a pointer; runs pin the one they start on."""

import json
import os
import shutil

import pytest

from macrid.data.batches import load_dataset, load_meta, snapshot_uri
from macrid.config import load_config
from macrid.errors import DataError
from macrid.data.prepare import KEEP_VERSIONS, prepare
from macrid.data.split import Protocol
from macrid.data.synthetic import SyntheticSpec, generate
from macrid.training.train import run_in_process


def spec(seed, users=300):
    return generate(SyntheticSpec(n_users=users, n_items=120, K=3, seed=seed))


def test_overwrite_publishes_a_new_version_and_keeps_the_newest(tmp_path):
    lake = str(tmp_path)
    versions = []
    for seed in range(KEEP_VERSIONS + 1):
        versions.append(prepare(spec(seed), lake, "d", Protocol(), overwrite=seed > 0)["version"])
    assert len(set(versions)) == len(versions)
    assert load_meta(lake, "d")["version"] == versions[-1]  # the pointer follows the newest
    on_disk = sorted(os.listdir(f"{lake}/datasets/d/versions"))
    assert on_disk == sorted(versions[-KEEP_VERSIONS:])  # older ones pruned, nothing half-written left
    assert load_dataset(lake, "d", version=versions[1]).meta["version"] == versions[1]
    with pytest.raises(DataError, match=f"version {versions[0]} of dataset 'd' is gone"):
        load_meta(lake, "d", versions[0])
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        prepare(spec(9), lake, "d", Protocol())


def test_a_resumed_run_keeps_the_version_it_started_on(tmp_path):
    lake = str(tmp_path)
    first = prepare(spec(1, users=300), lake, "d", Protocol())

    def cfg(epochs, *extra):
        return load_config(None, [f"data.lake={lake!r}", "data.dataset='d'", "run.name='r'", f"optim.epochs={epochs}",
                                  "model.K=3", "model.D=8", "run.progress=false", "optim.batch_size=50", *extra])
    run_in_process(cfg(1))
    second = prepare(spec(2, users=500), lake, "d", Protocol(), overwrite=True)  # more users, another vocabulary
    assert second["vocabulary_fingerprint"] != first["vocabulary_fingerprint"]
    resumed = run_in_process(cfg(2, "run.resume=true"))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert {h["users"] for h in resumed["history"]} == {first["train"]["users"]}  # never the new version's users
    assert resumed["vocabulary_fingerprint"] == first["vocabulary_fingerprint"]
    assert json.load(open(f"{lake}/runs/r/run.json"))["version"] == first["version"]


def test_datasets_of_schema_1_are_still_read(tmp_path):
    """The layout before versions: tables and _meta.json at the dataset's root, no "version" key."""
    lake = str(tmp_path)
    meta = prepare(spec(3), lake, "old", Protocol())
    root = f"{lake}/datasets/old"
    version_dir = snapshot_uri(lake, "old")
    for table in ("items", "users", "train", "val", "test"):
        shutil.move(f"{version_dir}/{table}", f"{root}/{table}")
    shutil.rmtree(f"{root}/versions")
    old_meta = {k: v for k, v in meta.items() if k != "version"} | {"schema_version": 1}
    with open(f"{root}/_meta.json", "w") as f:
        json.dump(old_meta, f)
    assert snapshot_uri(lake, "old") == root
    m = run_in_process(load_config(None, [f"data.lake={lake!r}", "data.dataset='old'", "run.name='o'",
                                          "optim.epochs=1", "model.K=3", "model.D=8", "run.progress=false"]))
    assert m["history"][0]["users"] == meta["train"]["users"] and m["test"]["ndcg@100"][0] > 0


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_its_name(tmp_path):
    """Its run.json alone (here naming another dataset and runner) is replaced by the next run of that name."""
    lake = str(tmp_path)
    prepare(spec(1, users=300), lake, "d", Protocol())
    os.makedirs(f"{lake}/runs/again")
    with open(f"{lake}/runs/again/run.json", "w") as f:
        json.dump({"dataset": "gone", "version": "", "vocabulary_fingerprint": "0" * 64, "runner": "ray",
                   "model": "macridvae"}, f)
    cfg = load_config(None, [f"data.lake={lake!r}", "data.dataset='d'", "run.name='again'", "optim.epochs=1",
                             "model.K=3", "model.D=8", "run.progress=false", "optim.batch_size=50"])
    assert run_in_process(cfg)["epochs_run"] == 1
    record = json.load(open(f"{lake}/runs/again/run.json"))
    assert record["dataset"] == "d" and record["runner"] == "in-process"
