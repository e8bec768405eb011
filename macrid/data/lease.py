"""A writer's lease on a lake folder: one job at a time writes there, and a second one is refused, not merged.

The lease is one small JSON object (`<folder>/_lease.json`) taken and renewed with `lake.switch_pointer`, a
compare-and-swap (S3: a conditional PUT; locally: under a file lock), so two jobs racing for it cannot both
win. It names its holder (job ID, host, pid) and when it expires; the holder renews it every `ttl_s / 4` from
a background thread. A holder that dies stops renewing: another job takes the lease over once it has
expired, or at once when the holder was a process of the same host that no longer exists.

    with Lease(uri, owner="20261207T035201-ab12cd", what="export nightly") as lease:
        ...                # write
        lease.check()      # before each commit: still ours (raises LeaseLost otherwise)
"""

from __future__ import annotations

import os
import socket
import threading
import time

from macrid.data import lake
from macrid.errors import DataError

LEASE_FILE = "_lease.json"
TTL_S = 600.0  # a killed holder blocks the folder for at most this long (10 minutes)


class LeaseHeld(DataError):
    """Another live job holds the lease."""


class LeaseLost(DataError):
    """This job's lease was taken over (it did not renew in time) or removed: it must not commit."""


def process_alive(pid: int) -> bool:
    """Whether a process of this host with this pid exists (someone else's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """Hold `<folder>/_lease.json` for the length of a `with` block; refuse when another live job holds it."""

    def __init__(self, folder: str, owner: str, what: str, ttl_s: float = TTL_S):
        self.uri = lake.join(folder, LEASE_FILE)
        self.owner, self.what, self.ttl_s = owner, what, ttl_s
        self._token: str | None = None
        self._lost: str = ""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        now = time.time()
        return {"owner": self.owner, "what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
                "renewed": now, "expires": now + self.ttl_s}

    def acquire(self) -> "Lease":
        token = lake.pointer_token(self.uri)
        if token is not None:
            try:
                held = lake.read_json(self.uri)
            except DataError:  # a damaged lease protects nothing: take it over as if expired
                held = {}
            if held and held.get("owner") != self.owner and _live(held):
                raise LeaseHeld(
                    f"{self.uri}: {held.get('what', 'another job')} (job {held.get('owner')}, host {held.get('host')}, "
                    f"pid {held.get('pid')}) is writing here; its lease expires at "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(held.get('expires', 0)))} unless it renews. "
                    "Wait for that job to end (one writer at a time keeps its files safe from this one's cleanup); "
                    "nothing was written")
        try:
            lake.switch_pointer(self.uri, self._record(), token)
        except lake.PointerMoved:
            raise LeaseHeld(f"{self.uri}: another job took the lease at the same moment; nothing was written. "
                            "Wait for it to end") from None
        self._token = lake.pointer_token(self.uri)
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            self.renew()

    def renew(self) -> None:
        """Push the expiry forward; a lease that changed under us (taken over, removed) is marked lost."""
        with self._lock:
            if self._lost:
                return
            try:
                lake.switch_pointer(self.uri, self._record(), self._token)
                self._token = lake.pointer_token(self.uri)
            except lake.PointerMoved:
                self._lost = f"{self.uri}: the lease was taken over by another job (it was not renewed for {self.ttl_s:.0f} s)"
            except DataError:
                pass  # the store did not answer this time; the next renewal tries again before the lease expires

    def check(self) -> None:
        """Raise LeaseLost unless this job still holds the lease: call it right before each commit."""
        with self._lock:
            if not self._lost and lake.pointer_token(self.uri) != self._token:
                self._lost = f"{self.uri}: the lease was taken over or removed while this job ran"
            if self._lost:
                raise LeaseLost(self._lost + "; this job stops before committing. Run it again")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self._lost or self._token is None:
                return
            try:
                if lake.pointer_token(self.uri) == self._token:
                    fs, path = lake.resolve(self.uri)
                    fs.delete_file(path)
            except (OSError, DataError):
                pass  # it expires by itself
            self._token = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _live(held: dict) -> bool:
    """Whether a lease record still protects its holder: not expired, and not a dead process of this host."""
    if time.time() > float(held.get("expires", 0)):
        return False
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
        return process_alive(held["pid"])
    return True
