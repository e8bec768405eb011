"""Errors a user can cause. Each message names the file, column or key, and what to do.

Messages never carry credentials: a URL's `user:password@` (an S3 endpoint, a Pushgateway) is shown as
`user:***@` in every MacridError and wherever `redact` is applied."""

import re
# ray: imported inside the functions that use them. Importing them is a start-up cost (Ray about 1.2 s on the
# development VM) that the paths without them (--help, in-process runs, tests) need not pay.

_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*):[^@\s/]*@")


def redact(text: str) -> str:
    """`scheme://user:secret@host` -> `scheme://user:***@host`, anywhere in text."""
    return _USERINFO.sub(r"\1:***@", text)


class MacridError(Exception):
    """Base class for errors caused by input, configuration or environment."""

    def __str__(self) -> str:
        return redact(super().__str__())


class DataError(MacridError):
    """Raw or prepared data is malformed: missing column, bad type, empty after filtering."""


class ConfigError(MacridError):
    """A configuration file or override names an unknown key or holds a bad value."""


class CheckpointError(MacridError):
    """A checkpoint does not match the data or the model it is loaded into."""


class ClusterError(MacridError):
    """A node or a worker of the Ray cluster was lost mid-job (a spot reclaim, a crash): nothing was committed."""


def lost_to_the_cluster(error: BaseException) -> bool:
    """Whether `error`, or anything in its cause chain, is Ray saying an actor, worker, node or object was lost."""
    import ray.exceptions as rx

    lost = (rx.RayActorError, rx.NodeDiedError, rx.ObjectLostError, rx.WorkerCrashedError)
    seen, cause = set(), error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, lost):
            return True
        seen.add(id(cause))
        cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
    return False


class EnvironmentProblem(MacridError):
    """The machine refused an operation on a path: no permission, a read-only or full disk, a folder where a
    file was expected (or the reverse). Raised with the path and what to do."""


_OS_HINTS = {  # errno -> what to do
    1: "no permission to write there: pick a path this user may write, or fix its permissions",
    13: "no permission: pick a path this user may read and write, or fix its permissions",
    17: "it already exists: pick another name, or remove it first",
    20: "a part of the path is a file, not a folder: fix the path",
    21: "it is a folder, but a file is needed here: give the file's path",
    28: "the disk is full: free space (or point the lake at a larger disk) and run the job again",
    30: "the file system is read-only: point the job at a writable folder",
    36: "the name is too long for this file system: use a shorter path",
    122: "the disk quota is exceeded: free space and run the job again",
}


def from_os_error(error: OSError, path: str = "") -> EnvironmentProblem | None:
    """An OSError the environment caused, as an EnvironmentProblem that names the path; None for other errors."""
    number = error.errno
    if number is None:  # pyarrow's local file system puts the errno in its message: "[errno 13] ..."
        found = re.search(r"\[errno (\d+)\]", str(error), re.IGNORECASE)
        number = int(found.group(1)) if found else None
    if number not in _OS_HINTS:
        return None
    where = error.filename or path or "a path"
    detail = (error.strerror or str(error)).splitlines()[0][:160]
    return EnvironmentProblem(f"{where}: {detail}; {_OS_HINTS[number]}")


def user_error(error: BaseException) -> MacridError | None:
    """What a job reports as bad input (exit status 2): a MacridError, or an OSError the environment caused
    (as an EnvironmentProblem naming the path). None: a fault of the program, left to raise."""
    if isinstance(error, MacridError):
        return error
    if isinstance(error, OSError) and not isinstance(error, (ConnectionError, TimeoutError)):
        return from_os_error(error)
    return None
