"""A sweep's search space, from a TOML file in the configs' own layout.

    [model]
    K = {choice = [3, 5, 7, 9]}
    sigma0 = {loguniform = [0.05, 0.5]}
    [optim]
    lr = {loguniform = [3e-4, 3e-3]}
    beta = {uniform = [0.0, 1.0]}

Every key must be a key of the config (macrid/config.py), checked before any trial starts, and
every value one distribution: `choice` (a list), `uniform` or `loguniform` (low, high). Keys not in
the file keep the base config's value (tau stays at 0.1 unless the file names it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from macrid.config import Config, read_toml
from macrid.errors import ConfigError

KINDS = ("choice", "uniform", "loguniform")


def load_space(path: str | Path, base: Config) -> dict[str, tuple[str, Any]]:
    """{"section.key": (kind, args)}; a key the config lacks or a malformed range is an error naming it."""
    raw = read_toml(path, "search space", "configs/search/")
    known = base.to_dict()
    space = {}
    for section, keys in raw.items():
        if section not in known or not isinstance(keys, dict):
            raise ConfigError(f"{path}: [{section}] is not a config section; use one of {sorted(known)}")
        for key, dist in keys.items():
            name = f"{section}.{key}"
            if key not in known[section]:
                raise ConfigError(f"{path}: {name} is not a config key; [{section}] has {sorted(known[section])}")
            if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in KINDS:
                raise ConfigError(f"{path}: {name} must be one distribution, e.g. {{choice = [1, 2]}} or "
                                  f"{{loguniform = [1e-4, 1e-2]}}; one of {KINDS}")
            kind, args = next(iter(dist.items()))
            if kind == "choice" and (not isinstance(args, list) or not args):
                raise ConfigError(f"{path}: {name}: choice takes a non-empty list")
            if kind != "choice" and (not isinstance(args, list) or len(args) != 2 or not args[0] < args[1]
                                     or (kind == "loguniform" and args[0] <= 0)):
                raise ConfigError(f"{path}: {name}: {kind} takes [low, high] with low < high"
                                  + (" and low > 0" if kind == "loguniform" else ""))
            if kind != "choice" and isinstance(known[section][key], (int, bool)) and \
                    not isinstance(known[section][key], float):
                raise ConfigError(f"{path}: {name} is an integer key, but {kind} draws real numbers; list its "
                                  f"values with {{choice = [...]}}")
            # every value a trial could get must make a valid config: the type and the range of the key
            for value in (args if kind == "choice" else args):
                try:
                    apply(base, {name: value})
                except ConfigError as e:
                    raise ConfigError(f"{path}: {name}: the value {value!r} is not valid for this key ({e})") from None
            space[name] = (kind, args)
    if not space:
        raise ConfigError(f"{path}: names no key to search")
    return space


def apply(base: Config, params: dict[str, Any]) -> Config:
    """The base config with a trial's values. When a Mult* baseline's D is searched, its hidden width follows
    it, which keeps the paper's budget of about 2*M*d parameters (MacridVAE's two M x D tables keep it by
    construction)."""
    raw = base.to_dict()
    for key, value in params.items():
        section, name = key.split(".")
        raw[section][name] = value
    if "model.D" in params and raw["model"]["name"] != "macridvae" and "model.hidden" not in params:
        raw["model"]["hidden"] = params["model.D"]
    return Config.from_dict(raw, source="sweep")
