"""`ray job submit` against a real local head started with `ray start --head`, as users run it."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_job_submit_end_to_end(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1",
               PATH=f"{BIN}:{os.environ['PATH']}")
    gcs, dashboard = free_port(), free_port()
    address = f"http://127.0.0.1:{dashboard}"
    subprocess.run([BIN / "ray", "start", "--head", "--num-cpus=2", f"--port={gcs}", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    lake = tmp_path / "lake"
    try:
        job = subprocess.run(
            [BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
             "python", "jobs/train.py", "--lake", str(lake), "--set", "optim.epochs=2", "--set", "run.name='job'",
             "--set", "run.progress=false"],
            env=env, capture_output=True, text=True, timeout=800)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout.lower()
    finally:
        subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    metrics = json.loads((lake / "runs" / "job" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["test"]["ndcg@100"][0] > 0
    assert (lake / "runs" / "job" / "checkpoints" / "best.pt").exists()
    assert (lake / "datasets" / "synthetic" / "_meta.json").exists()  # generated offline by the job itself
