"""A data job as stages of independent tasks, run on Ray Data or in this process, through the lake.

Each stage is a list of task specs (plain dicts) and one function. Tasks exchange data only through
files under a scratch folder of the lake (`Scratch`), never through the driver, so a stage's memory
is one task's input, whatever the data's size, and the same code runs on a laptop and on a cluster
whose nodes share an s3:// lake. The "local" runner runs the same tasks one after another in this
process (tests and small inputs), so there is one implementation whichever runs it.

The shuffle between two stages is a hash partition written as files: a task of the first stage
writes `<stage>/p<partition>/<task>.parquet`, and task p of the next stage reads `<stage>/p<p>/`.
Unlike Ray Data's in-memory hash shuffle, a partition is always exactly one task's input (no block
boundary can split a user's rows), and its memory is bounded by the partition's size on disk.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm import tqdm

from macrid.data import lake, layout
from macrid.data.lease import process_alive
from macrid.errors import DataError
# ray: imported inside the functions that use them. Importing them is a start-up cost (Ray about 1.2 s on the
# development VM) that the paths without them (--help, in-process runs, tests) need not pay.

log = logging.getLogger(__name__)
HASH_SEED = 0x5EED  # the partition of a key: polars' hash is stable within one polars version (one job)


def partition_of(keys: pl.Series, n: int) -> pl.Series:
    """(N,) keys -> (N,) partition numbers in [0, n), the same for equal keys in every task of a job."""
    return (keys.hash(seed=HASH_SEED) % n).cast(pl.Int32)


def read_frame(uri: str, columns: list[str] | None = None, filters=None) -> pl.DataFrame | None:
    """A Parquet file, or every Parquet file directly under a folder in name order, as one frame; None
    when the folder holds none. filters: a pyarrow.dataset expression applied while reading."""
    fs, path = lake.resolve(uri)
    files = [path] if uri.endswith(".parquet") else lake.list_parquet(uri)
    if not files:
        return None
    with lake.explained(uri):
        tables = [pq.read_table(f, columns=columns, filesystem=fs, filters=filters) for f in files]
    return pl.from_arrow(pa.concat_tables(tables, promote_options="default"))


class Scratch:
    """A job's private folder in the lake, deleted when the job ends (`<lake>/_scratch/<job>-<id>/`)."""

    def __init__(self, lake_root: str, job: str) -> None:
        self.root = layout.scratch_uri(lake_root, f"{job}-{uuid.uuid4().hex[:12]}")
        self._claimed = False

    def uri(self, *parts: str) -> str:
        """A path in the folder. The first use records who owns the folder (a later job removes the folder of one
        that died without deleting it: remove_dead_scratch); nothing is written before a job uses its scratch."""
        if not self._claimed:
            self._claimed = True
            lake.write_json(lake.join(self.root, OWNER_FILE),
                            {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
        return lake.join(self.root, *parts)

    def write(self, uri: str, df: pl.DataFrame) -> None:
        lake.write_parquet(uri, df.to_arrow(), scratch=True)

    def read(self, uri: str, columns: list[str] | None = None) -> pl.DataFrame | None:
        return read_frame(uri, columns)

    def write_partitions(self, folder: str, task: int, df: pl.DataFrame, key: str, n: int) -> None:
        """Hash-partition df by `key` (a column of partition numbers) into folder/p<k>/<task>.parquet."""
        for (k,), part in df.partition_by(key, as_dict=True, include_key=False).items():
            self.write(self.uri(folder, f"p{k:05d}", f"{task:06d}.parquet"), part)

    def delete(self) -> None:
        fs, path = lake.resolve(self.root)
        with lake.explained(self.root):
            fs.delete_dir_contents(path, missing_dir_ok=True)
            if not lake.is_s3(self.root) and fs.get_file_info(path).type != pafs.FileType.NotFound:
                fs.delete_dir(path)
                parent = path.rsplit("/", 1)[0]
                if not fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True)):
                    fs.delete_dir(parent)  # the lake's _scratch/, when no other job uses it


OWNER_FILE = "_owner.json"
DEAD_AFTER_S = 2 * 24 * 3600  # a scratch folder of another host (or without an owner) is removed after this


def remove_dead_scratch(lake_root: str, job: str) -> list[str]:
    """Delete the scratch folders (`<lake>/_scratch/<job>-<id>/`) of jobs that died without deleting them: a
    process of this host that no longer exists, or a folder older than DEAD_AFTER_S (another host's, where
    whether its job still runs cannot be told). A killed prepare's files (90 MB on ml-100k) would otherwise stay
    forever. Returns the removed folders."""
    fs, path = lake.resolve(lake.join(lake_root, "_scratch"))
    with lake.explained(lake_root):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    removed = []
    for info in infos:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith(f"{job}-"):
            continue
        folder = lake.join(lake_root, "_scratch", info.base_name)
        try:
            owner = lake.read_json(lake.join(folder, OWNER_FILE))
        except DataError:
            owner = {}
        here = owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int)
        dead = (here and not process_alive(owner["pid"])) or \
            (not here and time.time() - owner.get("started", (info.mtime.timestamp() if info.mtime else time.time()))
             > DEAD_AFTER_S)
        if dead:
            with lake.explained(folder):
                fs.delete_dir_contents(lake.resolve(folder)[1], missing_dir_ok=True)
                if not lake.is_s3(folder):
                    fs.delete_dir(lake.resolve(folder)[1])
            removed.append(folder)
    if removed:
        logging.getLogger(__name__).warning("removed %d scratch folder(s) of %s jobs that died without cleaning up: %s",
                                            len(removed), job, removed)
    return removed


class Stages:
    """Runs stages with one runner ("ray": Ray Data tasks on the cluster; "local": this process)."""

    def __init__(self, runner: str, job: str) -> None:
        if runner not in ("ray", "local"):
            raise ValueError(f"runner {runner!r}")
        self.runner, self.job = runner, job
        self.stats: list[str] = []  # Ray Data's ds.stats() of each stage, for benchmarks
        self.seconds: dict[str, float] = {}
        self.nodes: dict[str, set[str]] = {}  # the Ray nodes each stage's tasks ran on

    def require_shared(self, uris: list[str]) -> None:
        """On a Ray cluster of several nodes, tasks run anywhere: every path they read or write must be on
        storage all nodes see (s3://), not one node's disk."""
        if self.runner != "ray":
            return
        import ray

        local = [u for u in uris if not lake.is_s3(u)]
        if local and sum(n["Alive"] for n in ray.nodes()) > 1:
            raise DataError(f"{local[0]} is a local path, but this Ray cluster has several nodes whose tasks "
                            "could not see it; put the input and the lake on s3://, or run with --local")

    def run(self, name: str, fn: Callable[[dict], dict], specs: list[dict], cpus: float = 1.0) -> list[dict]:
        """fn(spec) for every spec, in parallel; results in spec order. A DataError in any task stops the
        job with that task's message (the lowest-numbered failing task, so the error is reproducible)."""
        t0 = time.perf_counter()
        if not specs:
            return []
        task = _Task(fn, f"{self.job}:{name}")
        if self.runner == "local":
            results = [task.call(s) for s in tqdm(specs, desc=f"{self.job} {name}", unit="task", leave=False)]
        else:
            import ray.data

            ds = ray.data.from_items([{"spec": json.dumps(s)} for s in specs], override_num_blocks=len(specs))

            def mapper(row: dict) -> dict:
                return task(row)

            mapper.__name__ = mapper.__qualname__ = task.__name__  # Ray Data names the stage after it
            ds = ds.map(mapper, num_cpus=cpus).materialize()
            self.stats.append(f"== {name} ==\n{ds.stats()}")
            results = [json.loads(r["result"]) for r in ds.take_all()]
            results.sort(key=lambda r: r["task"])
        errors = [r for r in results if "__error" in r]
        if errors:
            raise DataError(errors[0]["__error"])
        self.seconds[name] = time.perf_counter() - t0
        self.nodes[name] = {r["node"] for r in results if "node" in r}
        log.info("%s %s: %d tasks in %.1f s", self.job, name, len(specs), self.seconds[name])
        return results


class _Task:
    """A stage's function as Ray Data's row mapper: spec row -> result row; DataErrors become results."""

    def __init__(self, fn: Callable[[dict], dict], name: str) -> None:
        self.fn, self.__name__ = fn, name

    def call(self, spec: dict) -> dict:
        try:
            out = self.fn(spec)
        except DataError as e:
            out = {"__error": str(e)}
        return out | {"task": spec["task"]}

    def __call__(self, row: dict) -> dict:
        import ray

        node = ray.get_runtime_context().get_node_id()  # where it ran: a multi-node job spreads its tasks
        return {"result": json.dumps(self.call(json.loads(row["spec"])) | {"node": node})}
