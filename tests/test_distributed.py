"""Ray Train on real workers (2 CPU workers, gloo) against a real S3 endpoint on loopback."""

import json
import threading
import time
import urllib.request

import boto3
import pytest
import torch
from torch.testing import assert_close

from macrid.training import checkpoint
from macrid.config import load_config
from macrid.errors import CheckpointError, ConfigError
from macrid.training.launch import launch
from macrid.model.vae import build_model
from macrid.data.prepare import prepare
from macrid.data.split import Protocol
from macrid.data.synthetic import SyntheticSpec, generate
from macrid.training.train import run_in_process

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def s3_lake(ray_cluster, s3_endpoint):
    lake = "s3://lake/ci"
    prepare(generate(SyntheticSpec(n_users=600, n_items=200, K=4, seed=1)), lake, "syn", Protocol())
    return lake


def cfg_for(lake, run, *extra):
    return load_config(None, [f"data.lake={lake!r}", "data.dataset='syn'", f"run.name={run!r}", "model.K=4",
                              "model.D=16", "optim.batch_size=100", "run.progress=false",
                              # two workers and Ray Data's read tasks share the 2-CPU test cluster
                              "run.cpus_per_worker=0.5", *extra])


def s3_keys(prefix):
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="lake", Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_s3_prepare_train_two_workers_checkpoint_resume(s3_lake):
    first = launch(cfg_for(s3_lake, "two", "optim.epochs=3", "run.num_workers=2", "run.data='ray'"))
    assert first["epochs_run"] == 3
    # when epoch e reported, Ray Train had registered epoch e - 1's checkpoint: a restart redoes at most the
    # epoch in progress (uploads are asynchronous, but never more than one behind)
    assert [h["registered_epoch"] for h in first["history"]] == [0, 1, 2]
    assert first["history"][0]["checkpoint_wait_seconds"] == 0  # nothing before the first checkpoint
    assert all(h["checkpoint_wait_seconds"] > 0 for h in first["history"][1:])  # each epoch after waited for one
    keys = s3_keys("ci/runs/two/")
    assert {"ci/runs/two/metrics.json", "ci/runs/two/model.pt", "ci/runs/two/learning_curve.png",
            "ci/runs/two/checkpoint_manager_snapshot.json"} <= keys
    # Ray Train's own checkpoints, one per reported epoch, in the run folder; the latest and the best are kept
    ray_ckpts = {k.split("/")[3] for k in keys if k.split("/")[3].startswith("checkpoint_") and k.endswith(".pt")}
    assert 1 <= len(ray_ckpts) <= 2, keys
    snapshot = json.loads(boto3.client("s3").get_object(
        Bucket="lake", Key="ci/runs/two/checkpoint_manager_snapshot.json")["Body"].read())
    assert "checkpoint" in json.dumps(snapshot)
    resumed = launch(cfg_for(s3_lake, "two", "optim.epochs=4", "run.num_workers=2", "run.resume=true",
                             "run.data='ray'"))
    assert resumed["epochs_run"] == 4  # three restored epochs plus one new one, not four new ones
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    assert resumed["history"][:3] == first["history"]
    body = boto3.client("s3").get_object(Bucket="lake", Key="ci/runs/two/metrics.json")["Body"].read()
    assert json.loads(body)["epochs_run"] == 4
    # a driver lost after training (a sweep trial's actor gone with its node): the run is finished from its
    # folder alone, to the same metrics as the driver's own finish (from Ray's Result object) wrote
    from macrid.training.launch import finish_stored

    s3 = boto3.client("s3")
    for key in ("metrics.json", "model.pt"):
        s3.delete_object(Bucket="lake", Key=f"ci/runs/two/{key}")
    again = finish_stored(f"{s3_lake}/runs/two")
    assert (again["best_epoch"], again["val"], again["test"], again["history"]) == \
        (resumed["best_epoch"], resumed["val"], resumed["test"], resumed["history"])
    assert {"ci/runs/two/metrics.json", "ci/runs/two/model.pt"} <= s3_keys("ci/runs/two/")
    # a run stopped midway (a sweep's scheduler stopped the trial) is not finished: its latest checkpoint's
    # state says its training did not end
    latest = json.loads(s3.get_object(Bucket="lake", Key="ci/runs/two/checkpoint_manager_snapshot.json")["Body"]
                        .read())["latest_checkpoint_result"]["checkpoint_dir_name"]
    key = f"ci/runs/two/{latest}/train_state.json"
    state = json.loads(s3.get_object(Bucket="lake", Key=key)["Body"].read())
    assert state["ended"] is True and state["epoch"] == 4
    s3.put_object(Bucket="lake", Key=key, Body=json.dumps(state | {"ended": False}).encode())
    s3.delete_object(Bucket="lake", Key="ci/runs/two/metrics.json")
    assert finish_stored(f"{s3_lake}/runs/two") is None
    assert "ci/runs/two/metrics.json" not in s3_keys("ci/runs/two/")


@pytest.mark.parametrize("softmax", ["full", "row-sparse"])
def test_ddp_step_equals_single_worker_step(s3_lake, softmax):
    """Dropout, Gumbel and z sampling off; plain SGD so the step is proportional to the averaged gradient.

    "row-sparse": sampled softmax with so many negatives (4000 draws over 200 items) that every item is a
    candidate and log pi ~ -2e-9, so the loss is the full one, but h and t take sparse gradients that
    are exchanged by row_sparse.allreduce_rows instead of DDP.
    """
    exact = ["optim.epochs=1", "optim.batch_size=10000", "model.dropout=0.0", "model.gumbel=false",
             "model.sample=false", "optim.optimizer='sgd'", "optim.lr=0.5", "run.data='memory'"]
    if softmax == "row-sparse":
        exact.append("optim.negatives=4000")
    run_in_process(cfg_for(s3_lake, f"one-worker-{softmax}", *exact))
    two_run = launch(cfg_for(s3_lake, f"two-workers-{softmax}", *exact, "run.num_workers=2"))
    if softmax == "row-sparse":  # the tables really went through the row exchange: ~200 rows x 2 tables
        assert 0 < two_run["history"][0]["row_exchange_mb_per_step"] < 2 * 200 * 17 * 8 * 2 / 1e6
    # model.pt holds the best epoch's weights: with one epoch and no EMA, the weights after the one step
    saved = checkpoint.load(f"{s3_lake}/runs/one-worker-{softmax}/model.pt")
    one = saved["model"]
    two = checkpoint.load(f"{s3_lake}/runs/two-workers-{softmax}/model.pt")["model"]
    torch.manual_seed(98765)  # rank 0's seed: both runs start from this initialisation
    init = build_model(cfg_for(s3_lake, "x").model, saved["n_items"]).state_dict()
    assert saved["step"] == 1
    for name in one:
        assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=f"parameter {name} differs")
    assert (one["h"] - init["h"]).abs().max() > 1e-4  # the step really moved the weights


def test_killed_worker_resumes_from_rays_last_checkpoint(s3_lake):
    """Rank 1 is SIGKILLed at step 8 (epoch 2); Ray Train restarts the group from the epoch-1 checkpoint."""
    metrics = launch(cfg_for(s3_lake, "faulty", "optim.epochs=3", "run.num_workers=2", "run.fail_at_step=8",
                             "run.data='ray'",
                             "run.fail_rank=1", "run.max_failures=2"))
    assert metrics["epochs_run"] == 3 and [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert "ci/runs/faulty/_fault_injected" in s3_keys("ci/runs/faulty/")
    # steps per epoch = ceil(480 / 100) = 5: the failure at step 8 came in epoch 2, so epoch 1 was restored
    assert metrics["history"][-1]["step"] == 15


def test_every_rank_serves_prometheus_metrics_while_training(s3_lake):
    """Two workers: rank r serves on port + r; each rank's counters move during the run and never go back."""
    port = 19464
    seen = {0: {}, 1: {}}  # rank -> metric name -> values scraped in order

    def scrape():
        while not done.is_set():
            for rank in seen:
                try:
                    text = urllib.request.urlopen(f"http://127.0.0.1:{port + rank}/metrics", timeout=1).read().decode()
                except OSError:
                    continue
                for line in text.splitlines():
                    if line.startswith("macrid_train_") and not line.startswith("macrid_train_epoch_duration"):
                        name, labels_value = line.split("{", 1)
                        assert f'rank="{rank}"' in labels_value, line
                        seen[rank].setdefault(name, []).append(float(line.rsplit(" ", 1)[1]))
            time.sleep(0.2)

    done = threading.Event()
    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    try:
        launch(cfg_for(s3_lake, "metrics", "optim.epochs=6", f"run.metrics_port={port}", "optim.batch_size=20",
                       "run.num_workers=2", "run.data='memory'"))
    finally:
        done.set()
        thread.join()
    for rank in (0, 1):
        for counter in ("macrid_train_steps_total", "macrid_train_users_total", "macrid_train_seconds_total"):
            values = seen[rank].get(counter, [])
            assert len(set(values)) >= 2 and values == sorted(values), (rank, counter, values[:20])
        assert seen[rank]["macrid_train_loss"][-1] > 0
    # 480 training users in batches of 20 split over two ranks: each rank sees 10 users per step
    steps, users = seen[0]["macrid_train_steps_total"][-1], seen[0]["macrid_train_users_total"][-1]
    assert 10 * (steps - 1) <= users <= 10 * steps, (steps, users)  # a scrape may fall between the two increments


def test_resume_on_another_vocabulary_is_refused(s3_lake, tmp_path):
    prepare(generate(SyntheticSpec(n_users=300, n_items=150, K=3, seed=2)), s3_lake, "other", Protocol())
    with pytest.raises(CheckpointError, match="trained on dataset 'syn'.*data.dataset='other'"):
        launch(cfg_for(s3_lake, "two", "run.resume=true", "optim.epochs=5", "data.dataset='other'"))
    with pytest.raises(ConfigError, match="under Ray Train.*jobs/train.py --resume"):
        run_in_process(cfg_for(s3_lake, "two", "run.resume=true", "optim.epochs=5"))


def test_overwrite_during_a_streamed_run_does_not_change_what_it_reads(s3_lake):
    """prepare --overwrite publishes a new version on S3 while a 2-worker Ray Data run is at work:
    the run reads the version it pinned at its start from its first epoch to its last."""
    first = prepare(generate(SyntheticSpec(n_users=600, n_items=200, K=4, seed=11)), s3_lake, "snap", Protocol())
    result, errors = {}, []

    def run():
        try:
            result["m"] = launch(cfg_for(s3_lake, "pinned", "data.dataset='snap'", "optim.epochs=4",
                                         "run.num_workers=2", "run.data='stream'"))
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while "ci/runs/pinned/checkpoint_manager_snapshot.json" not in s3_keys("ci/runs/pinned/"):
        assert time.time() < deadline and thread.is_alive(), errors
        time.sleep(0.5)
    second = prepare(generate(SyntheticSpec(n_users=900, n_items=260, K=4, seed=12)), s3_lake, "snap", Protocol(),
                     overwrite=True)  # published after epoch 1's checkpoint, while later epochs still read
    assert thread.is_alive(), "the run ended before the overwrite: the test proves nothing"
    thread.join()
    assert not errors, errors
    m = result["m"]
    assert second["version"] != first["version"] and m["epochs_run"] == 4
    assert m["vocabulary_fingerprint"] == first["vocabulary_fingerprint"]
    # every epoch read the 480 training users of the pinned version (the new one has 720), less the
    # at most W - 1 = 1 user an equal split may leave out
    assert {h["users"] for h in m["history"]} <= {480, 478}, m["history"]


def test_a_warm_start_on_ray_train_workers_from_a_ray_train_parent_records_its_lineage(s3_lake):
    """Parent (run "two") and child both trained by Ray Train on the S3 lake; the child's dataset retires items, renames
    others (new IDs) and so numbers its vocabulary differently. The driver builds the initial checkpoint from
    the parent's best Ray checkpoint (ray.train.Result.from_path), both workers start from it."""
    import dataclasses

    import polars as pl

    from macrid.training.run_folder import read_vocabulary

    # the parent: run "two" of the first test (Ray Train, two workers, S3), as test_resume_on_another_vocabulary does
    raw = generate(SyntheticSpec(n_users=600, n_items=200, K=4, seed=1))
    moved = raw.interactions.filter(pl.col("item_id") >= 10).with_columns(
        item_id=pl.when(pl.col("item_id") >= 180).then(pl.col("item_id") + 1000).otherwise(pl.col("item_id")))
    prepare(dataclasses.replace(raw, interactions=moved, items=None), s3_lake, "syn-moved", Protocol())
    m = launch(cfg_for(s3_lake, "ws-child", "data.dataset='syn-moved'", "optim.epochs=1", "run.num_workers=2",
                       "run.data='memory'", "run.warm_start='two'"))
    record = json.loads(boto3.client("s3").get_object(Bucket="lake", Key="ci/runs/ws-child/run.json")["Body"].read())
    old = {str(i) for i in read_vocabulary(s3_lake, "two")["item_id"].to_pylist()}
    new = {str(i) for i in read_vocabulary(s3_lake, "ws-child")["item_id"].to_pylist()}
    from macrid.data.layout import load_meta

    assert record["parent"]["run"] == "two" and 1 <= record["parent"]["epoch"] <= 4  # its best of 4 epochs
    assert record["parent"]["vocabulary_fingerprint"] == load_meta(s3_lake, "syn")["vocabulary_fingerprint"]
    assert (record["parent"]["items"]["carried"], record["parent"]["items"]["added"],
            record["parent"]["items"]["dropped"]) == (len(old & new), len(new - old), len(old - new))
    assert len(new - old) > 0 and len(old - new) > 0
    assert m["parent"] == record["parent"] and m["epochs_run"] == 1


def test_a_sweep_waits_for_a_trial_whose_ray_train_run_goes_on_after_tune_lost_it(s3_lake):
    """Tune heard the trial's epoch 0 (its actor was lost); its Ray Train run trains on. The sweep's driver waits
    for that training to end and returns only once the run is finished (metrics.json, model.pt), instead of
    skipping it as it did."""
    from types import SimpleNamespace

    from macrid.training.launch import stored_progress
    from macrid.training.sweep import _finish_orphaned_trials

    cfg = cfg_for(s3_lake, "orphan-t1", "optim.epochs=4", "run.data='memory'")
    run = f"{s3_lake}/runs/orphan-t1"
    thread = threading.Thread(target=launch, args=(cfg,), daemon=True)
    thread.start()
    deadline = time.time() + 300
    while (stored_progress(run) is None or stored_progress(run).epoch < 1) and time.time() < deadline:
        time.sleep(0.5)
    assert not stored_progress(run).ended, "the run ended before the sweep looked: the test proves nothing"
    lost = SimpleNamespace(metrics={"trial_id": "t1", "epoch": 0}, error=None)  # what Tune last heard
    assert _finish_orphaned_trials(cfg, "orphan", [lost]) == []
    assert {"ci/runs/orphan-t1/metrics.json", "ci/runs/orphan-t1/model.pt"} <= s3_keys("ci/runs/orphan-t1/")
    assert stored_progress(run).ended and stored_progress(run).epoch == 4
    thread.join(timeout=120)
