"""Several nodes for real (issue 23): a Ray cluster of a head without training resources and worker nodes,
started on this machine (raylets on its own address, as Ray's multi-node tests run), the lake on the local
S3 server. Training spreads its ranks over nodes, and survives losing one: the run resumes from its last S3
checkpoint on a replacement node, with its history continuing without a gap or a repeat."""

from __future__ import annotations

import json
import threading
import time

import boto3
import pytest

from macrid.config import load_config
from macrid.data.prepare import prepare
from macrid.data.split import Protocol
from macrid.data.synthetic import SyntheticSpec, generate

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]
LAKE = "s3://lake/multinode"
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                          "health_check_failure_threshold": 4}


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """A head with no CPU (nothing trains there) and three 2-CPU worker nodes (a SPREAD run of 2 ranks uses
    two; the third is the spare capacity that takes over a lost node's rank); torn down after the module.
    Nodes are added and removed from the test's main thread only: starting a raylet installs signal handlers."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 << 20,
                                                     "include_dashboard": False,
                                                     "_system_config": FAST_FAILURE_DETECTION})
    for _ in range(3):
        c.add_node(num_cpus=2, object_store_memory=100 << 20)
    ray.init(address=c.address, configure_logging=False)
    c.wait_for_nodes()
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
                removed.update(node=node_id, at=time.time())
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
    assert removed["node"] not in {r["node_id"] for r in after} and len({r["node_id"] for r in after}) == 2
    assert removed["node"] not in worker_nodes(ray)
    restarted = min(r["started"] for r in after)
    print(f"[faults] node removed after epoch-1 checkpoint; ranks restarted {restarted - removed['at']:.1f} s later; "
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
