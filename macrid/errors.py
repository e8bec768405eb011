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
