"""Where every job runs: join a running Ray cluster, or start a local one on this machine."""

from __future__ import annotations

import logging
import os
import socket
import sys
# ray: imported inside the functions that use them. Importing them is a start-up cost (Ray about 1.2 s on the
# development VM) that the paths without them (--help, in-process runs, tests) need not pay.

LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2
log = logging.getLogger(__name__)


LOCAL_POLL_S = 0.25  # Ray Train's poll of its workers on a local Ray this job starts


def connect(dashboard: bool = True) -> bool:
    """Join a running Ray cluster (RAY_ADDRESS, `ray start`, `ray job submit`) or start a local one.

    Returns True when this process started its own local Ray. A running cluster is joined as it is:
    start-up options such as object_store_memory are refused there, so none are passed. dashboard: start
    the local Ray's dashboard (Ray Train polls its State API); jobs of plain tasks (prepare) go without it,
    saving about 1 GB and seconds of start-up on a laptop.
    """
    import ray

    if ray.is_initialized():
        return False
    # Only a cluster someone started for jobs: RAY_ADDRESS (set by `ray job submit` too), or the address file
    # `ray start` writes. Never ray.init("auto"), whose legacy fallback joins any Ray process on the machine,
    # such as another job's private local Ray, which goes down under this job when that job ends.
    address = os.environ.get("RAY_ADDRESS") or _started_cluster()
    if address:
        ray.init(address=address, configure_logging=False)
        return False
    log.info("no Ray cluster to join (RAY_ADDRESS is unset and `ray start` has not run here): starting a "
             "local Ray for this job")
    # A laptop is never preempted: Ray Train's preemption watcher (for spot nodes) only adds a core-worker
    # error line on every run (ray-project/ray#53727). Clusters the job joins keep it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray Train's controller collects reports when it polls its workers (every 2 s by default), and rank 0 waits
    # for each epoch's checkpoint to be registered: on a laptop's short epochs that wait was most of the epoch
    # (the default job: 29 s of training -> 8 s at 0.25 s). Read from the driver's environment; clusters keep 2 s.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(LOCAL_POLL_S))
    # The dashboard also serves Ray's State API, which Ray Train polls; without it every poll logs a warning.
    # address "local": always a new Ray of this job's own, never one Ray would find on the machine by itself
    ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1",
             object_store_memory=LOCAL_OBJECT_STORE_BYTES, configure_logging=False)
    return True


def _started_cluster() -> str | None:
    """The address `ray start` recorded on this machine, when a cluster answers there; else None."""
    from ray._private.utils import read_ray_address

    _forget_dead_local_cluster()
    return read_ray_address() or None


def _forget_dead_local_cluster() -> None:
    """A `ray start` head killed with SIGKILL (an OOM kill, a crash) leaves /tmp/ray/ray_current_cluster naming
    its dead GCS, and ray.init at that address would wait on it for minutes. When nothing answers there, remove the
    stale record (logged) so that this job starts a local Ray."""
    from ray._private.utils import get_ray_address_file, read_ray_address

    recorded, record = read_ray_address(), get_ray_address_file(None)
    if not recorded:
        return
    host, _, port = recorded.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return
    except (OSError, ValueError):
        pass
    log.warning("%s names a Ray cluster at %s that no longer answers (a Ray that was killed?); starting a "
                "local Ray instead", record, recorded)
    try:
        os.remove(record)
    except OSError:
        pass


def exit_now(status: int) -> None:
    """End a job's process with its own status, skipping the interpreter's teardown, where pyarrow and deltalake can
    abort the process after a successful commit (apache/arrow#34314, delta-io/delta-rs#2184), which a CronJob
    would report as a failure. Ray is shut down first, output flushed."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
