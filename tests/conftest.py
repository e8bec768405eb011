"""Shared fixtures. Real-data tests find MovieLens through MACRID_DATA (default ../shared/data)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MACRID_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # as cluster.connect sets for a local Ray
# Under pytest-xdist each worker process runs its own Ray clusters: a Ray folder of its own (sessions, sockets,
# and the address file `ray start` writes, which a job would otherwise join) keeps them apart. Short: Ray's
# socket paths must stay under the 107-byte limit.
if os.environ.get("PYTEST_XDIST_WORKER") and "RAY_TMPDIR" not in os.environ:
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=f"r{os.environ['PYTEST_XDIST_WORKER']}-", dir="/tmp")
# sweeps sign Tune's state with a key kept outside the lake; the tests' key never lands in the user's home
os.environ.setdefault("MACRID_STATE_KEY_FILE", os.path.join(tempfile.mkdtemp(prefix="macrid-key-"), "state.key"))


def real_data(name: str) -> Path:
    """Path of a real dataset, or skip with the reason (fail instead when MACRID_REQUIRE_DATA=1, as in CI)."""
    path = DATA / name
    if not path.exists():
        msg = f"real data {path} is absent: set MACRID_DATA to the folder holding {name}/"
        if os.environ.get("MACRID_REQUIRE_DATA") == "1":
            pytest.fail(msg + " (MACRID_REQUIRE_DATA=1 forbids skipping)")
        pytest.skip(msg)
    return path


def system_binary(name: str, package: str) -> str:
    """A Debian-packaged tool the tests run for real; skip without it (fail in CI, where .ci/run installs it)."""
    import shutil

    binary = shutil.which(name)
    if binary is None:
        msg = f"{name} is not installed (Debian package {package}; .ci/run installs it)"
        if os.environ.get("MACRID_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return binary


@pytest.fixture(scope="session")
def ml100k_lake(tmp_path_factory) -> str:
    from macrid.data.prepare import prepare
    from macrid.data.readers import read_raw
    from macrid.data.split import Protocol

    lake = str(tmp_path_factory.mktemp("lake"))
    prepare(read_raw(real_data("ml-100k")), lake, "ml-100k", Protocol())
    return lake


@pytest.fixture(scope="session")
def synthetic_lake(tmp_path_factory) -> str:
    from macrid.data.prepare import prepare
    from macrid.data.split import Protocol
    from macrid.data.synthetic import SyntheticSpec, generate

    lake = str(tmp_path_factory.mktemp("lake"))
    prepare(generate(SyntheticSpec(n_users=800, n_items=300, K=4)), lake, "synthetic", Protocol())
    return lake


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto) on loopback, in its own process; the AWS environment points at it.

    Its own process, not a thread of the test process: deltalake's Rust calls hold the GIL while they
    wait for the server, so a server thread in the same process could never answer them.
    The variables are set before any Ray cluster starts, so Ray workers inherit them.
    """
    import subprocess
    import sys

    import boto3

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_http(endpoint)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="lake")
    yield endpoint
    server.terminate()
    server.wait()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, tries: int = 200) -> None:
    """Until a server just started answers at url (any HTTP status), 50 ms apart."""
    import time
    import urllib.error
    import urllib.request

    for _ in range(tries):
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.05)


@pytest.fixture(scope="module")
def pushgateway():
    """A real Prometheus Pushgateway (Debian's) on loopback; its URL."""
    import subprocess

    binary = system_binary("prometheus-pushgateway", "prometheus-pushgateway")
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([binary, f"--web.listen-address={url.removeprefix('http://')}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_http(f"{url}/-/ready")
    yield url
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    """A 2-CPU local Ray cluster, as on the CI machine; started after the S3 environment is set."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, configure_logging=False)
    yield
    ray.shutdown()
