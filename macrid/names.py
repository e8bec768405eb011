"""The lake's naming rules: which names may become a folder of the lake (datasets, runs, exports, sweeps,
model aliases) and what a dataset version looks like. Shared below every layer: the config checks names
with them before anything touches the lake."""

from __future__ import annotations

import re

from macrid.errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
VERSION = re.compile(r"\d{8}T\d{12}Z-[0-9a-f]{8}")


def check_name(kind: str, name: str) -> str:
    """name, or a ConfigError that names the value and the rule. kind: 'dataset', 'run', 'export', ..."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"{kind} name {name!r} is not allowed: use 1 to 128 letters, digits, '.', '_' and '-', starting "
            f"with a letter or a digit and without '..' (it names a folder of the lake)")
    return name


def check_version(version: str) -> str:
    if not VERSION.fullmatch(version):
        raise ConfigError(f"dataset version {version!r} is not one prepare writes (e.g. "
                          "20261202T201500123456Z-0a1b2c3d); copy it from the dataset's _meta.json")
    return version


def is_version(name: str) -> bool:
    return VERSION.fullmatch(name) is not None
