"""ray_cluster.yaml passes Ray's own cluster-config validation and is sized for jobs/train.py's defaults."""

from pathlib import Path

import yaml

from macrid.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_config_passes_rays_validation():
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # raises on any schema error


def test_gpu_workers_fit_the_default_worker_size_and_install_a_pinned_cuda_torch():
    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    gpu = raw["available_node_types"]["gpu_worker"]["resources"]
    defaults = RunConfig()
    assert gpu["GPU"] >= defaults.gpus_per_worker
    # a worker reserves 1 CPU on a cluster (DEFAULT_CLUSTER_CPUS_PER_WORKER); the rest feeds Ray Data
    assert gpu["CPU"] >= 2
    assert raw["available_node_types"]["head"]["resources"] == {"CPU": 0}
    setup = " ".join(raw["setup_commands"])
    assert '"torch==' in setup and "/home/ubuntu/macrid" in setup and "ray[train,tune,data,default]==" in setup
