"""prepare on a 2-node Ray cluster on this machine (two raylets on loopback, as Ray's own multi-node tests
run): the input and the lake on the local S3 server, tasks scheduled on both nodes, the tables equal to the
in-memory protocol's; a local lake is refused there."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from macrid.data import lake
from macrid.data.prepare import prepare
from macrid.data.raw_input import Source
from macrid.data.split import Protocol
from macrid.data.stages import Stages
from macrid.errors import DataError
from reference.protocol import tables as reference_tables
from test_prepare import assert_same_tables, written


@pytest.fixture(scope="module")
def two_nodes(s3_endpoint):
    """A head with no CPU for tasks and two 1-CPU worker nodes: every task runs on a worker node."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 << 20,
                                                           "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=100 << 20) for _ in range(2)]
    ray.init(address=cluster.address, configure_logging=False)
    cluster.wait_for_nodes()
    yield nodes
    ray.shutdown()
    cluster.shutdown()


def test_prepare_spreads_over_two_nodes(two_nodes):
    import ray

    rng = np.random.default_rng(5)
    frames = [pl.DataFrame({"user_id": rng.integers(0, 400, 5000), "item_id": rng.integers(0, 600, 5000)})
              for _ in range(6)]
    for i, f in enumerate(frames):
        lake.write_parquet(f"s3://lake/two-nodes/raw/part-{i}.parquet", f.to_arrow())
    stages = Stages("ray", "prepare")
    protocol = Protocol(heldout=30, min_rating=None)
    prepare([Source("s3://lake/two-nodes/raw")], "s3://lake/two-nodes/lake", "d", protocol, partitions=4,
            stages=stages)
    workers = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0}
    assert len(workers) == 2
    assert stages.nodes["read"] == workers, "the 6 read tasks did not use both nodes"
    ref = reference_tables(pl.concat(frames).with_columns(rating=pl.lit(None, pl.Float64)), None, protocol)
    assert_same_tables(written("s3://lake/two-nodes/lake", "d"), ref)


def test_a_local_lake_is_refused_on_several_nodes(two_nodes, tmp_path):
    with pytest.raises(DataError, match="local path, but this Ray cluster has several nodes"):
        prepare([Source("s3://lake/two-nodes/raw")], str(tmp_path / "lake"), "d", Protocol(), runner="ray")
    assert not (tmp_path / "lake").exists()
