"""Errors a user can cause. Each message names the file, column or key, and what to do."""


class MacridError(Exception):
    """Base class for errors caused by input, configuration or environment."""


class DataError(MacridError):
    """Raw or prepared data is malformed: missing column, bad type, empty after filtering."""


class ConfigError(MacridError):
    """A configuration file or override names an unknown key or holds a bad value."""


class CheckpointError(MacridError):
    """A checkpoint does not match the data or the model it is loaded into."""
