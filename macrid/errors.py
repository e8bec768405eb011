"""Errors a user can cause. Each message names the file, column or key, and what to do.

Messages never carry credentials: a URL's `user:password@` (an S3 endpoint, a Pushgateway) is shown as
`user:***@` in every MacridError and wherever `redact` is applied."""

import re

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
