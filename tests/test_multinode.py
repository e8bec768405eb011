"""Several nodes for real (issue 23): a Ray cluster of a head without training resources and worker nodes,
started on this machine (raylets on its own address, as Ray's multi-node tests run), the lake on the local
S3 server. Training spreads its ranks over nodes, and survives losing one: the run resumes from its last S3
checkpoint on a replacement node, with its history continuing without a gap or a repeat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from macrid.config import load_config
from macrid.data.layout import load_meta
from macrid.data.prepare import prepare
from macrid.data.split import Protocol
from macrid.data.synthetic import SyntheticSpec, generate

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]
LAKE = "s3://lake/multinode"
TRAIN = str(Path(__file__).resolve().parents[1] / "jobs" / "train.py")
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                          "health_check_failure_threshold": 4}


def start_cluster(workers: int):
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 << 20,
                                                     "include_dashboard": False,
                                                     "_system_config": FAST_FAILURE_DETECTION})
    for _ in range(workers):
        c.add_node(num_cpus=2, object_store_memory=100 << 20)
    c.wait_for_nodes()
    return c


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """A head with no CPU (nothing trains there) and three 2-CPU worker nodes (a SPREAD run of 2 ranks uses
    two; the third is the spare capacity that takes over a lost node's rank); torn down after the module.
    Nodes are added and removed from the test's main thread only: starting a raylet installs signal handlers."""
    import ray

    ray.shutdown()
    c = start_cluster(3)
    ray.init(address=c.address, configure_logging=False)
    prepare(generate(SyntheticSpec(n_users=600, n_items=200, K=4, seed=3)), LAKE, "syn", Protocol())
    yield c
    ray.shutdown()
    c.shutdown()


def cfg(run: str, *extra):
    return load_config(None, [f"data.lake={LAKE!r}", "data.dataset='syn'", f"run.name={run!r}", "model.K=4",
                              "model.D=16", "optim.batch_size=100", "run.progress=false", "run.num_workers=2",
                              "run.placement='SPREAD'", "run.cpus_per_worker=1", "run.data='stream'", *extra])


def s3_json(key: str) -> dict:
    return json.loads(boto3.client("s3").get_object(Bucket="lake", Key=key)["Body"].read())


def s3_keys(prefix: str) -> set[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="lake", Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def worker_nodes(ray) -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0}


def test_two_ranks_train_on_two_nodes_through_ray_data_with_s3_checkpoints(cluster):
    import ray

    from macrid.training.launch import launch

    metrics = launch(cfg("spread", "optim.epochs=2"))
    ranks = [s3_json(f"multinode/runs/spread/_workers/rank-{r}.json") for r in range(2)]
    assert ranks[0]["node_id"] != ranks[1]["node_id"]  # one rank per node
    assert {r["node_id"] for r in ranks} <= worker_nodes(ray)  # never the head
    keys = s3_keys("multinode/runs/spread/")
    assert any(k.split("/")[3].startswith("checkpoint_") for k in keys if k.count("/") >= 4)
    assert metrics["epochs_run"] == 2 and metrics["config"]["run"]["data"] == "stream"


def test_losing_a_node_mid_run_resumes_from_the_s3_checkpoint_on_a_replacement(cluster):
    """Rank 1's node is removed once epoch 1's checkpoint is on S3; the spare node takes its place; Ray Train
    restarts the group, which resumes from the last checkpoint: epochs 1..E once each, steps continuous."""
    import ray

    from macrid.training.launch import launch

    run, epochs = "node-loss", 8
    removed: dict = {}

    def remove_rank1_node():
        deadline = time.time() + 300
        while time.time() < deadline:
            if "multinode/runs/node-loss/checkpoint_manager_snapshot.json" in s3_keys("multinode/runs/node-loss/"):
                node_id = s3_json("multinode/runs/node-loss/_workers/rank-1.json")["node_id"]
                victim = next(n for n in cluster.worker_nodes if n.node_id == node_id)
                removed.update(node=node_id, at=time.time(), on_storage=newest_on_storage(run))
                cluster.remove_node(victim)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=remove_rank1_node, daemon=True)
    killer.start()
    metrics = launch(cfg(run, f"optim.epochs={epochs}", "run.max_failures=3"))
    killer.join(timeout=5)
    assert removed, "the run ended before its node could be removed"
    history = metrics["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))  # no gap, no repeat
    steps_per_epoch = history[0]["step"]
    assert [h["step"] for h in history] == [steps_per_epoch * e for e in range(1, epochs + 1)]
    after = [s3_json(f"multinode/runs/{run}/_workers/rank-{r}.json") for r in range(2)]
    assert all(r["started"] > removed["at"] for r in after), "the group was not restarted after the loss"
    # SPREAD is best effort: the restarted ranks may share a node when the spare one is busy (seen under a
    # loaded CI machine); what must hold is that none runs on the removed node
    assert removed["node"] not in {r["node_id"] for r in after}
    assert removed["node"] not in worker_nodes(ray)
    restarted = min(r["started"] for r in after)
    # what the restart redid beyond the epoch in progress: the newest checkpoint on storage at the loss against
    # the epoch the new group resumed from (Ray Train resumes from the last registered one)
    resumed_from = history[-1]["resumed_from"]
    redone = removed["on_storage"] - resumed_from
    # the epoch in progress is redone and nothing more; 1 only if the loss fell between an upload's end and its
    # registration, when rank 0 waits and trains nothing
    assert 1 <= resumed_from and redone <= 1, (removed, resumed_from)
    wait = [h["checkpoint_wait_seconds"] for h in history[1:]]
    print(f"[faults] node removed after epoch-1 checkpoint; ranks restarted {restarted - removed['at']:.1f} s later; "
          f"newest checkpoint on storage at the loss: epoch {removed['on_storage']}, resumed from epoch "
          f"{resumed_from}: checkpointed epochs redone {redone}; rank 0's wait for its checkpoint's registration "
          f"{sum(wait) / len(wait):.2f} s per epoch (epochs {sum(h['seconds'] for h in history) / len(history):.2f} s); "
          f"final val ndcg@100 {history[-1].get('val_ndcg@100')}")


def test_a_local_lake_is_refused_on_several_nodes(cluster, tmp_path):
    from macrid.errors import ConfigError
    from macrid.training.launch import launch

    prepare(generate(SyntheticSpec(n_users=200, n_items=80, K=4, seed=3)), str(tmp_path), "syn", Protocol())
    local = load_config(None, [f"data.lake={str(tmp_path)!r}", "data.dataset='syn'", "run.name='local'",
                               "run.num_workers=2", "run.progress=false"])
    with pytest.raises(ConfigError, match="local path, but this Ray cluster has several nodes"):
        launch(local)
    assert not (tmp_path / "runs" / "local" / "checkpoint_manager_snapshot.json").exists()


def submit(address: str, run: str, *sets: str, env: dict | None = None) -> subprocess.Popen:
    """jobs/train.py as a job driver joined to the cluster, as `ray job submit` runs it (its own process, so that
    this test's main thread stays free to add and remove nodes)."""
    args = [sys.executable, TRAIN, "--lake", LAKE, "--resume", "if-any"]  # the spot RayJob's retry command
    for kv in (*COMMON, f"run.name={run!r}", *sets):
        args += ["--set", kv]
    return subprocess.Popen(args, env=os.environ | {"RAY_ADDRESS": address} | (env or {}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


# after a node loss, an elastic run first retries its old size until Ray Train's worker-group start timeout
# (60 s by default) passes; Ray Train hands this variable from the driver to its controller
SHORT_GROUP_START = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}
COMMON = ("data.dataset='syn'", "model.K=4", "model.D=16", "optim.batch_size=100", "run.progress=false")


def wait_for(what: str, predicate, timeout: float = 240.0, driver: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        if driver is not None and driver.poll() is not None:
            pytest.fail(f"the driver ended (exit {driver.returncode}) before {what}:\n{driver.stdout.read()[-3000:]}")
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def ranks_started_after(run: str, world: int, after: float):
    """The rank records of a group of `world` workers started after `after`, or None."""
    try:
        records = [s3_json(f"multinode/runs/{run}/_workers/rank-{r}.json") for r in range(world)]
    except Exception:  # noqa: BLE001 - not written yet
        return None
    ok = all(r["world"] == world and r["started"] > after for r in records)
    return records if ok else None


def test_elastic_workers_go_on_with_fewer_after_a_node_loss_and_grow_back(cluster):
    """--num-workers 1-2 (elastic), one 2-CPU worker per node: a node is removed after epoch 1's checkpoint, the
    run goes on with one worker, a node is added, and it grows back to two. Every epoch runs once, with the
    global batch fixed: each epoch's steps and users follow its world size W (ceil((N // W) / (B // W)) steps,
    W * (N // W) users)."""
    import ray

    run, epochs = "elastic", 15
    start = time.time()
    ensure_worker_nodes(cluster, ray, 2)  # exactly two: with a spare, a lost node would just be replaced
    driver = submit(cluster.address, run, f"optim.epochs={epochs}", "run.num_workers=2", "run.min_workers=1",
                    "run.resize_check_s=2", "run.cpus_per_worker=2", "run.data='memory'", "run.max_failures=4",
                    env=SHORT_GROUP_START)
    try:
        two = wait_for("two ranks", lambda: ranks_started_after(run, 2, start), driver=driver)
        wait_for("epoch 1's checkpoint", lambda: f"multinode/runs/{run}/checkpoint_manager_snapshot.json"
                 in s3_keys(f"multinode/runs/{run}/"), driver=driver)
        lost_at, on_storage = time.time(), newest_on_storage(run)
        cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == two[1]["node_id"]))
        one = wait_for("the group of one", lambda: ranks_started_after(run, 1, lost_at), driver=driver)
        added_at = time.time()
        cluster.add_node(num_cpus=2, object_store_memory=100 << 20)
        again = wait_for("the group of two again", lambda: ranks_started_after(run, 2, added_at), driver=driver)
        out, _ = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-3000:]
    metrics = s3_json(f"multinode/runs/{run}/metrics.json")
    history = metrics["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))  # no gap, no repeat
    worlds = [h["workers"] for h in history]
    # 2, then 1 (none when the node came back before the 1-worker group ended an epoch: `one` proves it ran), then 2
    assert worlds[0] == 2 and worlds[-1] == 2 and set(worlds) <= {1, 2}, worlds
    ones = [i for i, w in enumerate(worlds) if w == 1]
    assert ones == list(range(ones[0], ones[-1] + 1)) if ones else True, worlds  # one stretch at W = 1
    assert one[0]["world"] == 1
    n = load_meta(LAKE, "syn")["train"]["users"]
    steps = [h["step"] for h in history]
    for h, before in zip(history, [0] + steps):
        w = h["workers"]
        assert h["step"] - before == -(-(n // w) // (100 // w)), h
        assert h["users"] == w * (n // w), h
    assert len({r["node_id"] for r in again}) == 2
    # what the resize redid beyond the epoch in progress: the newest checkpoint on storage at the loss against
    # the epoch the first group after it resumed from (the first row of a restarted group)
    resumed_from = next(h["resumed_from"] for h in history if h["resumed_from"] > 0)
    redone = on_storage - resumed_from
    assert 1 <= resumed_from and redone <= 1, (on_storage, resumed_from)
    for line in out.splitlines():  # what Ray Train said while it resized (in the -s output of benchmarks/faults.md)
        if any(w in line.lower() for w in ("timed out", "timeout", "resiz", "insufficient", "restart")):
            print(f"[faults] elastic driver: {line.strip()[:240]}")
    print(f"[faults] elastic: node removed after epoch-1 checkpoint; one worker {one[0]['started'] - lost_at:.1f} s "
          f"later; node added, two workers {min(r['started'] for r in again) - added_at:.1f} s later; "
          f"workers per epoch {worlds}; newest checkpoint on storage at the loss: epoch {on_storage}, resumed from "
          f"epoch {resumed_from}: checkpointed epochs redone {redone}; final val ndcg@100 "
          f"{history[-1].get('val_ndcg@100')}")


def test_a_sweep_trial_lost_with_its_node_restarts_from_its_own_checkpoint(cluster):
    """A sweep of two trials, one at a time: once the second trial's first checkpoint is on S3, its node is
    removed. The trial restarts on the other node from that checkpoint (Tune's FailureConfig, then Ray Train's
    resume), the finished first trial is not run again, and the sweep ends with best.toml."""
    import ray

    from macrid.training.sweep import run_sweep

    sweep, epochs = "sweep-loss", 5
    ensure_worker_nodes(cluster, ray, 2)
    removed: dict = {}

    def trial_runs() -> list[str]:
        return sorted({k.split("/")[2] for k in s3_keys(f"multinode/runs/{sweep}-") if k.endswith("_workers/rank-0.json")},
                      key=lambda r: s3_json(f"multinode/runs/{r}/_workers/rank-0.json")["started"])

    def remove_second_trials_node():
        deadline = time.time() + 400
        while time.time() < deadline and not removed:
            runs = trial_runs()
            if len(runs) == 2 and latest_epoch(runs[1]) >= 1:
                node_id = s3_json(f"multinode/runs/{runs[1]}/_workers/rank-0.json")["node_id"]
                victim = next(n for n in cluster.worker_nodes if n.node_id == node_id)
                removed.update(node=node_id, at=time.time(), run=runs[1], first=runs[0])
                cluster.remove_node(victim)
            time.sleep(0.3)

    base = load_config(None, [f"data.lake={LAKE!r}", *COMMON, f"optim.epochs={epochs}", "run.num_workers=1",
                              "run.cpus_per_worker=1", "run.data='memory'", "run.max_failures=3"])
    killer = threading.Thread(target=remove_second_trials_node, daemon=True)
    killer.start()
    result = run_sweep(base, {"optim.lr": ("loguniform", [1e-3, 1e-2])}, sweep, samples=2, concurrent=1,
                       grace_epochs=epochs)
    killer.join(timeout=5)
    assert removed, "the sweep ended before the second trial's node could be removed"
    assert result["trials"] == 2 and "best.toml" in result["best_config"]
    assert f"multinode/runs/{sweep}/best.toml" in s3_keys(f"multinode/runs/{sweep}/")
    first = s3_json(f"multinode/runs/{removed['first']}/_workers/rank-0.json")
    assert first["started"] < removed["at"]  # the finished trial was not run again
    lost = s3_json(f"multinode/runs/{removed['run']}/_workers/rank-0.json")
    assert lost["started"] > removed["at"] and lost["node_id"] != removed["node"]
    for run in (removed["first"], removed["run"]):
        keys = s3_keys(f"multinode/runs/{run}/")
        assert f"multinode/runs/{run}/metrics.json" in keys, sorted(k for k in keys if "checkpoint_2" not in k)
        history = s3_json(f"multinode/runs/{run}/metrics.json")["history"]
        assert [h["epoch"] for h in history] == list(range(1, epochs + 1)), run  # once each, none redone
    print(f"[faults] sweep: trial {removed['run']}'s node removed after its epoch-1 checkpoint; restarted "
          f"{lost['started'] - removed['at']:.1f} s later on another node; best {result['val_ndcg@100']:.4f}")
    ensure_worker_nodes(cluster, ray, 2)


def test_an_export_that_loses_a_node_commits_nothing_and_its_rerun_commits_each_row_once(cluster):
    """Date A is exported; date B's export loses a node holding one of its actors while it writes. Either Ray
    Data runs the lost batches again on another actor, or the export fails, naming the cause, with date A
    intact and nothing of date B visible, and is run again. Either way date B ends committed once: one row
    per (user, component) and per (user, rank), and its folder holds exactly the files its commit holds."""
    import polars as pl
    import ray

    from macrid.output import delta
    from macrid.output.export import ExportSpec, export, export_uri

    ensure_worker_nodes(cluster, ray, 2)
    # one 1.5-CPU actor per node (two would not fit; the rest is for the read tasks): whichever node goes holds one
    spec = ExportSpec(lake=LAKE, run="spread", input="syn", name="node-loss", date="2026-12-01", top_n=5,
                      workers=2, cpus_per_worker=1.5, batch_size=5)
    export(spec, progress=False)
    comps_uri, recs_uri = export_uri(LAKE, "node-loss", "user_components"), export_uri(LAKE, "node-loss",
                                                                                      "recommendations")
    date_a = {uri: read_delta(uri) for uri in (comps_uri, recs_uri)}
    job = [sys.executable, str(Path(TRAIN).with_name("export.py")), "--lake", LAKE, "--run", "spread", "--input",
           "syn", "--name", "node-loss", "--date", "2026-12-02", "--top-n", "5", "--workers", "2",
           "--cpus-per-worker", "1.5", "--batch-size", "5", "--quiet"]
    driver = subprocess.Popen(job, env=os.environ | {"RAY_ADDRESS": cluster.address}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        def files_of_date_b() -> int:
            n = sum(k.endswith(".parquet") for k in s3_keys("multinode/exports/node-loss/user_components/dt=2026-12-02/"))
            return n if n >= 4 else 0
        written = wait_for("date B's first files", files_of_date_b, timeout=120, driver=driver)
        cluster.remove_node(next(iter(cluster.worker_nodes)), allow_graceful=False)
        ensure_worker_nodes(cluster, ray, 2)  # capacity comes back, as an autoscaler would bring it
        out, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    if driver.returncode == 0:  # Ray Data ran the lost actor's batches again on another actor
        outcome = "retried the lost batches and committed"
    else:  # or the export failed: cleanly, naming the cause, with nothing committed; then it is run again
        outcome = "failed cleanly, then its re-run committed"
        assert driver.returncode == 2 and "an export worker was lost" in out and "nothing was committed" in out, \
            out[-3000:]
        assert "Traceback" not in out
        for uri, rows in date_a.items():
            assert read_delta(uri).equals(rows)  # date A intact, no row of date B visible
        again = subprocess.run(job, env=os.environ | {"RAY_ADDRESS": cluster.address}, capture_output=True,
                               text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
    summary = delta.open_table(comps_uri).history(1)[0]
    comps, recs = read_delta(comps_uri), read_delta(recs_uri)
    b_comps, b_recs = comps.filter(pl.col("dt") == "2026-12-02"), recs.filter(pl.col("dt") == "2026-12-02")
    users = date_a[comps_uri]["user_id"].n_unique()
    K = 4  # model.K of the runs in this module (COMMON)
    assert b_comps.height == users * K and b_comps.select("user_id", "component").n_unique() == b_comps.height
    assert b_recs.select("user_id", "rank").n_unique() == b_recs.height == users * 5
    assert comps.filter(pl.col("dt") == "2026-12-01").sort("user_id", "component").equals(
        date_a[comps_uri].sort("user_id", "component"))
    for uri in (comps_uri, recs_uri):  # date B's folder holds exactly the files its commit holds: no dead file
        folder = uri.removeprefix("s3://lake/") + "/dt=2026-12-02/"
        on_s3 = {k.rsplit("/", 1)[1] for k in s3_keys(folder)} - {""}  # "" is the folder marker
        held = {u.rsplit("/", 1)[1] for u in delta.open_table(uri).file_uris() if "dt=2026-12-02" in u}
        assert on_s3 == held and held, uri
    assert delta.open_table(comps_uri).version() == 1  # one commit per export that succeeded
    print(f"[faults] export: a node (with one of the 2 actors) removed after {written} of date B's files; the "
          f"export {outcome} {b_comps.height} component rows once each; commit: "
          f"{json.loads(summary.get('macrid', '{}')).get('unheld_removed', {})} unheld files of the re-run removed")
    ensure_worker_nodes(cluster, ray, 2)


def read_delta(uri: str):
    import polars as pl

    from macrid.data import lake
    from macrid.output import delta

    return pl.read_delta(delta.table_uri(uri), storage_options=lake.delta_storage_options(uri))

def ensure_worker_nodes(cluster, ray, count: int) -> None:
    """Exactly `count` worker nodes (from the main thread: starting a raylet installs signal handlers)."""
    while len(cluster.worker_nodes) > count:
        cluster.remove_node(next(iter(cluster.worker_nodes)))
    while len(cluster.worker_nodes) < count:
        cluster.add_node(num_cpus=2, object_store_memory=100 << 20)
    cluster.wait_for_nodes()
    wait_for(f"{count} worker nodes", lambda: len(worker_nodes(ray)) == count)

def test_losing_the_whole_cluster_then_the_same_command_on_a_fresh_one_continues_the_run(cluster):
    """What a RayJob retry after a spot reclaim does: the driver and every node (head included) are killed
    with SIGKILL once epoch 2's checkpoint is on S3; a fresh cluster starts, and the same command (same run
    name, --resume) continues from the S3 checkpoint: epochs 1..E once each, steps continuous. Runs last:
    it takes the module's cluster down."""
    import ray

    run, epochs = "cluster-loss", 5
    ensure_worker_nodes(cluster, ray, 2)
    sets = (f"optim.epochs={epochs}", "run.num_workers=2", "run.placement='SPREAD'", "run.cpus_per_worker=1",
            "run.data='memory'")  # the node-loss test streams; here each rank reads its share from S3 itself
    first = submit(cluster.address, run, *sets)

    try:
        wait_for("epoch 2's checkpoint", lambda: latest_epoch(run) >= 2, driver=first)
    finally:
        first.kill()  # the head pod goes, and its driver with it
        first.communicate()
    killed_at, done, on_storage = time.time(), latest_epoch(run), newest_on_storage(run)
    ray.shutdown()
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node, allow_graceful=False)
    cluster.remove_node(cluster.head_node, allow_graceful=False)
    cluster.shutdown()  # nothing left to stop: resets the address records
    assert done < epochs, "the run ended before the cluster could be lost"

    fresh = start_cluster(2)
    try:
        second = submit(fresh.address, run, *sets)  # the same command
        out, _ = second.communicate(timeout=400)
    finally:
        fresh.shutdown()
    assert second.returncode == 0, out[-3000:]
    assert f"resumed {run} at epoch {done}" in out  # from the checkpoint, not from scratch
    history = s3_json(f"multinode/runs/{run}/metrics.json")["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    steps_per_epoch = history[0]["step"]
    assert [h["step"] for h in history] == [steps_per_epoch * e for e in range(1, epochs + 1)]
    after = [s3_json(f"multinode/runs/{run}/_workers/rank-{r}.json") for r in range(2)]
    assert all(r["started"] > killed_at for r in after) and len({r["node_id"] for r in after}) == 2
    resumed_from = history[-1]["resumed_from"]
    assert resumed_from == done and on_storage - resumed_from <= 1, (on_storage, resumed_from)
    print(f"[faults] cluster loss after epoch {done}'s checkpoint; fresh cluster's ranks started "
          f"{min(r['started'] for r in after) - killed_at:.1f} s after the kill; newest checkpoint on storage at "
          f"the kill: epoch {on_storage}, resumed from epoch {resumed_from}: checkpointed epochs redone "
          f"{on_storage - resumed_from}; final val ndcg@100 {history[-1].get('val_ndcg@100')}")


def newest_on_storage(run: str) -> int:
    """The newest epoch among the run's checkpoint folders on S3 (uploaded, registered with Ray Train or not)."""
    states = [k for k in s3_keys(f"multinode/runs/{run}/") if k.endswith("/train_state.json")]
    epochs = []
    for key in states:
        try:
            epochs.append(s3_json(key)["epoch"])
        except Exception:  # noqa: BLE001 - deleted by Ray's checkpoint pruning between the listing and the read
            continue
    return max(epochs, default=0)


def latest_epoch(run: str) -> int:
    """The epoch of the run's latest checkpoint on S3 (Ray Train's snapshot), 0 before the first."""
    try:
        snap = s3_json(f"multinode/runs/{run}/checkpoint_manager_snapshot.json")
    except Exception:  # noqa: BLE001 - not written yet
        return 0
    return (snap.get("latest_checkpoint_result") or {}).get("metrics", {}).get("epoch", 0)
