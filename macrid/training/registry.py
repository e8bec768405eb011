"""Model aliases: a name in the lake that points at the run in production, with the history of every decision.

    <lake>/models/<NAME>/current.json            {"run", "stack": earlier runs, newest last, "time", ...}
    <lake>/models/<NAME>/history/<time>-<id>.json  one record per promotion, refusal and rollback

Moving the alias is one atomic write of current.json (an S3 PUT, a local rename), so a reader sees the old
run or the new one, never a mix. History records are separate objects (no append on S3): each is written
before the pointer moves, and listing the folder in name order gives them in time order.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid

import pyarrow.fs as pafs

from macrid.data import lake, layout
from macrid.errors import ConfigError

CURRENT = "current.json"
STACK_DEPTH = 30  # how many earlier runs --rollback can go back through


def current(lake_root: str, name: str) -> dict | None:
    """The alias's pointer, or None when NAME was never promoted."""
    uri = lake.join(layout.model_uri(lake_root, name), CURRENT)
    return lake.read_json(uri) if lake.exists(uri) else None


def current_run(lake_root: str, name: str) -> str:
    """The run NAME points to; a ConfigError that says how to promote one when it points nowhere."""
    pointer = current(lake_root, name)
    if pointer is None:
        raise ConfigError(f"model {name!r} has no promoted run in {layout.model_uri(lake_root, name)}; promote one "
                          f"with jobs/promote.py --lake {lake_root} --model {name} --candidate RUN")
    return pointer["run"]


def resolve(lake_root: str, ref: str) -> str:
    """A run name, or a model alias (a name with a promoted run: its run). An alias wins over a run of the same
    name, so `--warm-start prod` follows the alias, as the nightly job means it to."""
    layout.check_name("run or model", ref)
    pointer = current(lake_root, ref)
    if pointer is not None:
        return pointer["run"]
    if lake.exists(lake.join(layout.run_uri(lake_root, ref), "run.json")):
        return ref
    raise ConfigError(f"{ref!r} is neither a model alias ({layout.model_uri(lake_root, ref)}) nor a run "
                      f"({layout.run_uri(lake_root, ref)}) of lake {lake_root}")


def with_parent(cfg, ref: str):
    """The config with run.warm_start set to the run `ref` names now (a run, or what a model alias points to),
    resolved once, so that a resumed run keeps its parent when the alias moves on."""
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, warm_start=resolve(cfg.data.lake, ref)))


def record(lake_root: str, name: str, event: dict) -> dict:
    """Write one history record (event: promoted, refused, rolled_back, with its details); returns it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    entry = {"time": now.isoformat(timespec="seconds"), "model": name} | event
    stamp = f"{now:%Y%m%dT%H%M%S%fZ}"  # names sort in time order
    lake.write_json(lake.join(layout.model_uri(lake_root, name), "history", f"{stamp}-{uuid.uuid4().hex[:8]}.json"),
                    entry)
    return entry


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def history(lake_root: str, name: str) -> list[dict]:
    """Every record, oldest first."""
    fs, path = lake.resolve(lake.join(layout.model_uri(lake_root, name), "history"))
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    folder = lake.join(layout.model_uri(lake_root, name), "history")
    return [lake.read_json(lake.join(folder, i.base_name)) for i in sorted(infos, key=lambda i: i.base_name)
            if i.base_name.endswith(".json")]


def point(lake_root: str, name: str, run: str, details: dict) -> dict:
    """Move NAME to `run` (the run it pointed to goes on the rollback stack); returns the new pointer."""
    old = current(lake_root, name)
    stack = ([*old.get("stack", []), old["run"]] if old else [])[-STACK_DEPTH:]
    pointer = {"run": run, "stack": stack, "time": _now()} | details
    lake.write_json(lake.join(layout.model_uri(lake_root, name), CURRENT), pointer)
    return pointer


def rollback(lake_root: str, name: str) -> dict:
    """NAME back to the run it pointed to before its latest promotion; returns the new pointer."""
    old = current(lake_root, name)
    if old is None or not old.get("stack"):
        raise ConfigError(f"model {name!r} has no earlier run to roll back to "
                          f"({'never promoted' if old is None else 'only one promotion so far'})")
    *rest, previous = old["stack"]
    record(lake_root, name, {"event": "rolled_back", "from": old["run"], "to": previous})
    pointer = {"run": previous, "stack": rest, "time": _now(), "rolled_back_from": old["run"]}
    lake.write_json(lake.join(layout.model_uri(lake_root, name), CURRENT), pointer)
    return pointer
