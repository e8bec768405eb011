"""Which Ray a job runs on: the cluster someone started for it, never another job's private local Ray."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.timeout(300)

# a job that holds its own local Ray (as jobs/prepare.py does) for a few seconds, then ends with it
HOLDER = """
import sys, time
from macrid.cluster import connect
import ray
started = connect(dashboard=False)
print("holder", started, ray.get_runtime_context().gcs_address, flush=True)
time.sleep(float(sys.argv[1]))
"""


def test_two_jobs_started_at_once_on_one_machine_both_finish(tmp_path):
    """Job A starts its private local Ray and ends 12 s later; job B, a real jobs/prepare.py started while A runs,
    must start a Ray of its own. Joined to A's (ray.init("auto") finds any Ray process on the machine), B's
    tasks died with A's Ray ("Owner's node has crashed")."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, "12"], env=env, stdout=subprocess.PIPE, text=True)
    first = holder.stdout.readline().split()
    assert first[:2] == ["holder", "True"], first  # A started its own local Ray
    job = subprocess.run([sys.executable, str(ROOT / "jobs" / "prepare.py"), "--synthetic", "--syn-n-users", "3000",
                          "--lake", str(tmp_path / "lake"), "--name", "b"], env=env, capture_output=True, text=True,
                         timeout=240)
    holder.wait(timeout=60)
    assert holder.returncode == 0 and job.returncode == 0, job.stderr[-3000:]
    assert "Owner's node has crashed" not in job.stderr and (tmp_path / "lake" / "datasets" / "b" / "_meta.json").exists()
    assert "starting a local Ray for this job" in job.stderr  # B ran on a Ray of its own, not A's


def test_a_cluster_started_with_ray_start_is_joined_by_address(tmp_path):
    """The address file `ray start` writes names the cluster; a job joins it (and a stale one is forgotten)."""
    from ray._private.utils import get_ray_address_file

    from macrid.cluster import _started_cluster

    record = get_ray_address_file(None)
    if os.path.exists(record):
        pytest.skip(f"{record} exists: a `ray start` cluster is running on this machine")
    os.makedirs(os.path.dirname(record), exist_ok=True)
    with open(record, "w") as f:
        f.write("127.0.0.1:9")  # nothing answers on the discard port
    try:
        assert _started_cluster() is None and not os.path.exists(record)
    finally:
        if os.path.exists(record):
            os.remove(record)
