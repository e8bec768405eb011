"""The nightly export: a trained run's users, items, recommendations and prototypes, as Delta tables.

    driver   run's model.pt + its dataset's vocabulary; the input's user rows (export_input)
    Ray Data read_parquet(user rows) -> map_batches(ExportWorker, actor pool: the model loads once per actor)
             each actor computes a batch (represent.users) and writes its data files itself, uncommitted
    driver   item concepts and prototypes (M rows, chunk by chunk); then one Delta commit per table that
             replaces the date's partition, with our metadata; then the Pushgateway

<lake>/exports/<name>/{user_components,item_concepts,recommendations,prototypes}/dt=YYYY-MM-DD/.
Columns, types and example queries: docs/export-schema.md. Memory stays bounded: each actor holds the
model, the item-ID and user-ID lookups and one batch; the driver only collects file records.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import time
import uuid
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from macrid.cluster import connect
from macrid.data import lake, layout
from macrid.data.batches import snapshot_uri
from macrid.data.lease import Lease
from macrid.data.ray_data import lists_to_batch
from macrid.errors import ClusterError, ConfigError, DataError, lost_to_the_cluster
from macrid.model.vae import MacridVAE, item_concept
from macrid.output import delta, manifest, represent
from macrid.output.export_commit import Transaction, vacuum
from macrid.output.export_input import Source, is_dataset, merge_heldout, prepared, raw
from macrid.output.export_tables import (
    SCHEMA_VERSION,
    TABLES,
    components_table,
    item_concepts_table,
    prototypes_table,
    recommendations_table,
    schemas_of,
)
from macrid.output.published import published_run
from macrid.training.checkpoint import load_model
from macrid.training.run_folder import MODEL_FILE
# ray: imported inside the functions that use them. Importing them is a start-up cost (Ray about 1.2 s on the
# development VM) that the paths without them (--help, in-process runs, tests) need not pay.

ITEM_CHUNK = 65_536


@dataclass(frozen=True)
class ExportSpec:
    lake: str
    run: str
    input: str
    name: str
    date: str = ""  # YYYY-MM-DD; "" = today (UTC)
    top_n: int = 0
    workers: int = 1  # actors
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    batch_size: int = 2000  # users per actor call
    format: str = "auto"
    user_col: str = "user_id"
    item_col: str = "item_id"
    rating_col: str | None = None
    fail_after_batches: int = 0  # fault injection (tests): each actor raises after this many batches
    local: bool = False  # compute in this process, no Ray: for small exports, where Ray's start-up dominates
    retention_hours: int = 168  # vacuum: files no version of this window uses are deleted (Delta's default week)


MAX_TOP_N = 2**31 - 1  # the rank column is int32


def export_uri(lake_root: str, name: str, table: str = "") -> str:
    return layout.export_uri(lake_root, name, table)


def export(spec: ExportSpec, progress: bool = True) -> dict:
    """Run the export; returns the summary also recorded in every table's commit."""
    t0 = time.time()
    spec = _checked(spec)
    tag = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    model, saved, vocab, run_record = published_run(spec.lake, spec.run)
    with Lease(export_uri(spec.lake, spec.name), owner=tag, what=f"export {spec.name}") as lease:
        summary = _export_held(spec, tag, model, saved, vocab, run_record, lease, progress)
    vacuumed = {table: removed for table in (*TABLES, manifest.TABLE)
                if (removed := vacuum(export_uri(spec.lake, spec.name, table), spec.retention_hours))}
    if vacuumed:
        summary["vacuumed"] = vacuumed
    summary["seconds"]["total"] = round(time.time() - t0, 3)
    return summary


def _export_held(spec: ExportSpec, tag: str, model: MacridVAE, saved: dict, vocab: pl.DataFrame, run_record: dict,
                 lease: Lease, progress: bool) -> dict:
    """The export proper, under the name's lease: compute and write every file, check every table's columns,
    commit the tables one by one, then the manifest that makes them one export. On failure, delete this
    export's uncommitted files and no committed one."""
    t0 = time.time()
    stage = export_uri(spec.lake, spec.name, f"_staging/{tag}")
    transaction = Transaction(lambda table: export_uri(spec.lake, spec.name, table), spec.date, tag, lease)
    try:
        source = _source(spec, saved["vocabulary_fingerprint"], vocab, run_record, stage)
        t_input = time.time()
        files = _users(spec, source, run_record, tag, progress)
        t_users = time.time()
        files["item_concepts"], files["prototypes"] = _items(spec, model, vocab, tag)
        t_items = time.time()
        counts = dict(source.counts, users_exported=sum(f["users"] for f in files["user_components"]),
                      items=len(vocab), recommendations=sum(f["rows"] for f in files["recommendations"]))
        summary = {
            "schema_version": SCHEMA_VERSION, "export_id": tag, "date": spec.date, "top_n": spec.top_n,
            "checkpoint": {"run": spec.run, "file": lake.join(_run_uri(spec), MODEL_FILE), "epoch": saved["epoch"],
                           "step": saved["step"], "vocabulary_fingerprint": saved["vocabulary_fingerprint"],
                           "trained_on": run_record},
            "model": {"K": model.K, "D": model.D, "tau": model.tau, "similarity": model.similarity},
            "input": source.record, "counts": counts,
            "seconds": {"input": round(t_input - t0, 3), "users": round(t_users - t_input, 3),
                        "items": round(t_items - t_users, 3)},
        }
        schemas = schemas_of(vocab["item_id"].to_arrow().type, source.user_type, spec.top_n,
                             item_bias=model.item_bias is not None)
        schemas[manifest.TABLE] = manifest.SCHEMA
        transaction.commit(schemas, files, summary)
    except BaseException:
        transaction.roll_back((*TABLES, manifest.TABLE))
        raise
    finally:
        _remove(stage)
    return summary


def _checked(spec: ExportSpec) -> ExportSpec:
    date = spec.date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
            raise ValueError
        datetime.date.fromisoformat(date)
    except ValueError:
        raise ConfigError(f"--date {date!r} is not a date; pass YYYY-MM-DD, e.g. 2026-11-28") from None
    layout.check_name("export", spec.name)
    layout.check_name("run", spec.run)
    if spec.top_n < 0 or spec.workers < 1 or spec.batch_size < 1:
        raise ConfigError("--top-n must be >= 0, --workers and --batch-size >= 1")
    if spec.retention_hours < 1:
        raise ConfigError(f"--retention-hours {spec.retention_hours}: pass at least 1; time travel to earlier exports "
                          "(and readers pinned by the manifest) need their files for that long")
    if spec.top_n > MAX_TOP_N:
        raise ConfigError(f"--top-n {spec.top_n} is more than the recommendations table's int32 rank holds "
                          f"({MAX_TOP_N}); pass at most {MAX_TOP_N}")
    lake_root = spec.lake if lake.is_s3(spec.lake) else os.path.abspath(spec.lake)
    lake.check_root(lake_root)
    return ExportSpec(**(asdict(spec) | {"date": date, "lake": lake_root}))


def _run_uri(spec: ExportSpec) -> str:
    return layout.run_uri(spec.lake, spec.run)


def _source(spec: ExportSpec, fingerprint: str, vocab: pl.DataFrame, run_record: dict, stage: str) -> Source:
    if is_dataset(spec.lake, spec.input):
        return prepared(spec.lake, spec.input, fingerprint)
    if "/" not in spec.input and not os.path.exists(spec.input):
        raise DataError(f"--input {spec.input!r} is neither a dataset of {spec.lake} (ls "
                        f"{lake.join(spec.lake, 'datasets')}) nor a file or folder of raw interactions")
    # rows without a rating column (implicit data, or no --rating-col) are kept; rated ones below min_rating,
    # and rows whose rating is missing, are not

    if not spec.local:
        connect()
    return raw(spec.input, vocab.select("item_idx", "item_id"), run_record["min_rating"], stage, spec.lake,
               spec.format, spec.user_col, spec.item_col, spec.rating_col, runner="local" if spec.local else "ray")


def _users(spec: ExportSpec, source: Source, run_record: dict, tag: str, progress: bool) -> dict[str, list[dict]]:
    """Ray Data over the user rows; actors compute and write. Returns each table's file records."""
    if spec.local:
        return _users_here(spec, source, run_record, tag, progress)

    connect()
    with _ray_data_settings():
        return _users_on_ray(spec, source, run_record, tag, progress)


@contextlib.contextmanager
def _ray_data_settings():
    """Ray Data's process-wide settings and log levels for the export, put back as they were afterwards (the
    export runs inside jobs/nightly.py, whose other stages keep theirs)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.use_datasource_v2, ctx.enable_progress_bars)
    loggers = [logging.getLogger(n) for n in ("ray.data", "ray.data._internal.progress")]
    levels = [g.level for g in loggers]
    ctx.execution_options.preserve_order = True  # same batches on a re-run: identical content
    ctx.use_datasource_v2 = False  # (see ray_data.train_dataset)
    ctx.enable_progress_bars = False  # ours counts users; Ray Data's would print a status block every few seconds
    loggers[0].setLevel(logging.WARNING)
    loggers[1].setLevel(logging.ERROR)  # "progress bars disabled": ours
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.use_datasource_v2, ctx.enable_progress_bars = saved
        for g, level in zip(loggers, levels):
            g.setLevel(level)


def _users_on_ray(spec: ExportSpec, source: Source, run_record: dict, tag: str, progress: bool
                  ) -> dict[str, list[dict]]:
    import ray.data

    fs, _ = lake.resolve(spec.lake)
    # one block per file: the shards are already sized for a task (100,000 users), and splitting them into
    # hundreds of blocks only adds scheduling
    parts = [ray.data.read_parquet(source.files["bags"], filesystem=fs, num_cpus=0.25,
                                   override_num_blocks=len(source.files["bags"]))] if source.files.get("bags") else []
    if source.files.get("heldout"):
        parts.append(ray.data.read_parquet(source.files["heldout"], filesystem=fs, num_cpus=0.25,
                                           override_num_blocks=len(source.files["heldout"]),
                                           columns=["user_idx", "foldin", "heldout"])
                     .map_batches(merge_heldout, batch_format="pyarrow", num_cpus=0.25))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    snap = snapshot_uri(spec.lake, run_record["dataset"], run_record["version"])
    with warnings.catch_warnings():  # max_restarts goes through **ray_remote_args, deprecated without a successor
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        ds = _map_users(ds, spec, source, snap, tag)
    files: dict[str, list[dict]] = {"user_components": [], "recommendations": []}
    bar = tqdm(total=source.counts["users_input"] - source.counts["users_without_known_items"], unit="user",
               unit_scale=True, desc="export users", disable=not progress)
    # Ray Data logs a failed task's traceback at ERROR before raising it; the exception itself reaches the job
    # (a lost node as a ClusterError, anything else as it is), and Ray Data's own log file keeps the details
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    data_log.setLevel(logging.CRITICAL)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                files[row["table"]].append(row)
                if row["table"] == "user_components":
                    bar.update(row["users"])
    except Exception as e:
        if not lost_to_the_cluster(e):
            raise
        raise ClusterError(f"export {spec.name} for {spec.date}: an export worker was lost with its node or process "
                           f"({type(e).__name__}); nothing was committed and this export's files are removed. Run "
                           "the same export again: it recomputes the date") from e
    finally:
        data_log.setLevel(level)
        bar.close()
    return files


def _users_here(spec: ExportSpec, source: Source, run_record: dict, tag: str, progress: bool) -> dict[str, list[dict]]:
    """The same worker, in this process, over the same files in the same order (`local`)."""
    snap = snapshot_uri(spec.lake, run_record["dataset"], run_record["version"])
    worker = ExportWorker(**_worker_kwargs(spec, source, snap, tag))
    files: dict[str, list[dict]] = {"user_components": [], "recommendations": []}
    bar = tqdm(total=source.counts["users_input"] - source.counts["users_without_known_items"], unit="user",
               unit_scale=True, desc="export users", disable=not progress)
    fs, _ = lake.resolve(spec.lake)  # the source's files are paths on the lake's filesystem
    tables = [pq.read_table(f, filesystem=fs) for f in source.files.get("bags", [])]
    tables += [merge_heldout(pq.read_table(f, columns=["user_idx", "foldin", "heldout"], filesystem=fs))
               for f in source.files.get("heldout", [])]
    for table in tables:
        for start in range(0, table.num_rows, spec.batch_size):
            for row in worker(table.slice(start, spec.batch_size)).to_pylist():
                files[row["table"]].append(row)
                if row["table"] == "user_components":
                    bar.update(row["users"])
    bar.close()
    return files


def _worker_kwargs(spec: ExportSpec, source: Source, snap: str, tag: str) -> dict:
    return {"run": _run_uri(spec), "items_uri": lake.join(snap, "items"), "users_uri": source.users_uri,
            "tables": export_uri(spec.lake, spec.name), "date": spec.date, "tag": tag, "top_n": spec.top_n,
            "threads": max(1, int(spec.cpus_per_worker)), "fail_after": spec.fail_after_batches}


def _map_users(ds, spec: ExportSpec, source: Source, snap: str, tag: str):
    import ray.data

    return ds.map_batches(
        ExportWorker, batch_size=spec.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=spec.workers), num_cpus=spec.cpus_per_worker,
        num_gpus=spec.gpus_per_worker or None,
        # a failed actor fails the export (nothing is committed; the nightly job is re-run). Ray Data's
        # default (-1) also makes Ray log an error line about restartable actors on every run.
        max_restarts=0,
        fn_constructor_kwargs=_worker_kwargs(spec, source, snap, tag))


class ExportWorker:
    """One Ray Data actor: loads the model once, then turns batches of user rows into written data files."""

    def __init__(self, run: str, items_uri: str, users_uri: str | None, tables: str, date: str, tag: str,
                 top_n: int, threads: int, fail_after: int):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, _ = load_model(run)
        self.model = model.to(self.device).eval()
        self.item_ids = lake.read_table(items_uri, ["item_id"])["item_id"].combine_chunks()  # (M,) by item_idx
        self.user_ids = lake.read_table(users_uri, ["user_id"])["user_id"].combine_chunks() if users_uri else None
        self.tables, self.date, self.tag, self.top_n, self.calls = tables, date, tag, top_n, 0
        self.fail_after = fail_after

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        if self.fail_after and self.calls > self.fail_after:
            raise RuntimeError(f"injected failure after {self.fail_after} batches (fail_after_batches)")
        indices, offsets = lists_to_batch(batch["items"])  # zero-copy Arrow -> (N,), (B+1,) int64 tensors
        user_ids = batch["user_id"] if "user_id" in batch.column_names else \
            self.user_ids.take(batch["user_idx"].combine_chunks())
        out = represent.users(self.model, indices, offsets, self.top_n)
        B, K = out.share.shape
        records = [dict(delta.write_file(lake.join(self.tables, "user_components"), self.date,
                                         components_table(user_ids, out.mu, out.share), self.tag),
                        table="user_components", users=B)]
        if self.top_n:
            records.append(dict(delta.write_file(lake.join(self.tables, "recommendations"), self.date,
                                                  recommendations_table(user_ids, self.item_ids, out), self.tag),
                                table="recommendations", users=B))
        return pa.Table.from_pylist(records)


def _items(spec: ExportSpec, model: MacridVAE, vocab: pl.DataFrame, tag: str) -> tuple[list[dict], list[dict]]:
    """Item concepts chunk by chunk, and the prototypes; written, not committed."""
    uri = export_uri(spec.lake, spec.name, "item_concepts")
    ids = vocab["item_id"].to_arrow()
    titles = vocab["title"].to_arrow()
    files, per_concept = [], np.zeros(model.K, dtype=np.int64)
    for lo in range(0, len(vocab), ITEM_CHUNK):
        hi = min(lo + ITEM_CHUNK, len(vocab))
        c, h, bias = represent.items(model, lo, hi)  # (C, K), (C, D), (C,) or None
        concept = item_concept(c).cpu().numpy()  # (C,) the mode, as steering and recommendations have it
        c, h = c.float().cpu().numpy(), h.float().cpu().numpy()
        per_concept += np.bincount(concept, minlength=model.K)
        table = item_concepts_table(ids.slice(lo, hi - lo), titles.slice(lo, hi - lo), concept, c, h,
                                    None if bias is None else bias.float().cpu().numpy())
        files.append(delta.write_file(uri, spec.date, table, tag))
    prototypes = prototypes_table(model.m.detach().float().cpu().numpy(), per_concept)  # (K, D), (K,)
    return files, [delta.write_file(export_uri(spec.lake, spec.name, "prototypes"), spec.date, prototypes, tag)]


def _remove(uri: str) -> None:
    fs, path = lake.resolve(uri)
    try:
        fs.delete_dir(path)
    except (OSError, FileNotFoundError):
        pass
