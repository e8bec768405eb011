"""`ray job submit` against a real local head started with `ray start --head`, as users run it."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_head(temp_dir: str) -> None:
    """Stop the processes of the head started on `temp_dir`, leaving any other Ray alone."""
    for signal in ("-TERM", "-KILL"):
        subprocess.run(["pkill", signal, "-f", temp_dir], capture_output=True)
        time.sleep(2)
    shutil.rmtree(temp_dir, ignore_errors=True)


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
    # A private temp dir identifies this head's processes, so teardown stops them and no other Ray.
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths have a length limit
    subprocess.run([BIN / "ray", "start", "--head", "--num-cpus=2", f"--port={gcs}", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats",
                    f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={free_port()}",
                    f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                    f"--dashboard-agent-grpc-port={free_port()}"], env=env, check=True, capture_output=True, timeout=120)
    lake = tmp_path / "lake"
    try:
        for _ in range(30):  # the dashboard's job agent comes up a few seconds after `ray start` returns
            job = subprocess.run(
                [BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                 "python", "jobs/train.py", "--lake", str(lake), "--set", "optim.epochs=2", "--set", "run.name='job'",
                 "--set", "run.progress=false"],
                env=env, capture_output=True, text=True, timeout=800)
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(2)
        (tmp_path / "job.log").write_text(job.stdout + job.stderr)
        assert job.returncode == 0, f"ray job submit failed; its output is in {tmp_path / 'job.log'}:\n" + (
            job.stdout + job.stderr)[-4000:]
        assert "succeeded" in job.stdout.lower()
    finally:
        stop_head(temp_dir)
    metrics = json.loads((lake / "runs" / "job" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["test"]["ndcg@100"][0] > 0
    assert (lake / "runs" / "job" / "model.pt").exists()
    assert (lake / "runs" / "job" / "checkpoint_manager_snapshot.json").exists()  # Ray Train's own checkpoints
    assert (lake / "datasets" / "synthetic" / "_meta.json").exists()  # generated offline by the job itself
