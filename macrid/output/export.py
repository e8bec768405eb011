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

from macrid.data.lease import Lease
from macrid.output import delta, manifest
from macrid.data import lake, layout
from macrid.data.batches import snapshot_uri
from macrid.errors import ClusterError, ConfigError, DataError, lost_to_the_cluster
from macrid.output.export_input import Source, is_dataset, merge_heldout, prepared, raw
from macrid.model.vae import MacridVAE, item_concept
from macrid.output.published import published_run
from macrid.training.run_folder import MODEL_FILE
from macrid.training.checkpoint import load_model

SCHEMA_VERSION = 2  # 2: recommendations.rank is int32 (1: int16; such tables are widened on the next export)
TABLES = ("user_components", "recommendations", "item_concepts", "prototypes")
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
                if (removed := _vacuum(export_uri(spec.lake, spec.name, table), spec.retention_hours))}
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
    committed: list[str] = []
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
        schemas = {}
        for table in TABLES:
            if table == "recommendations" and not spec.top_n:
                continue
            schema = SCHEMAS[table](vocab["item_id"].to_arrow().type, source.user_type)
            if table == "item_concepts" and model.item_bias is not None:
                schema = schema.append(pa.field("bias", pa.float32()))  # only then: older tables keep their columns
            schemas[table] = schema
        schemas[manifest.TABLE] = manifest.SCHEMA
        for table, schema in schemas.items():  # every table before any commit
            delta.check_schema(export_uri(spec.lake, spec.name, table), schema)
        versions: dict[str, int] = {}
        for table, schema in schemas.items():  # one commit per table; the summary's timings cover what came before
            if table == manifest.TABLE:
                continue
            uri = export_uri(spec.lake, spec.name, table)
            lease.check()  # a writer that lost its lease (it stalled past the expiry) must not commit
            versions[table] = delta.commit(uri, schema, files[table], spec.date, summary)
            committed.append(table)
            removed = delta.remove_unheld(uri, spec.date, tag)  # this export's files its commit lacks (a lost actor's)
            if removed:
                summary.setdefault("unheld_removed", {})[table] = len(removed)
        summary["versions"] = dict(versions)
        # last: the manifest that makes the date's tables one export for readers (docs/export-schema.md)
        uri = export_uri(spec.lake, spec.name, manifest.TABLE)
        listing = manifest.rows(versions, {t: sum(f["rows"] for f in files[t]) for t in versions}, summary)
        lease.check()
        summary["versions"][manifest.TABLE] = delta.commit(
            uri, manifest.SCHEMA, [delta.write_file(uri, spec.date, listing, tag)], spec.date, summary)
        committed.append(manifest.TABLE)
    except BaseException:
        for table in (*TABLES, manifest.TABLE):
            uri = export_uri(spec.lake, spec.name, table)
            # a table whose commit reached its log (even if what followed it raised) keeps its files
            if table not in committed and not _committed_anyway(uri, tag):
                delta.delete_uncommitted(uri, spec.date, tag)
        raise
    finally:
        _remove(stage)
    return summary


def _vacuum(uri: str, retention_hours: int) -> int:
    """Delete the files no version of the last `retention_hours` uses (a killed export's, older versions' that
    time travel no longer reaches); returns how many. A failure is logged, not raised: the export has
    committed, and the next export's vacuum removes what this one could not."""
    table = delta.open_table(uri)
    if table is None:
        return 0
    try:
        with lake.explained(uri):
            if not table.vacuum(retention_hours, dry_run=True, enforce_retention_duration=False, full=True):
                return 0  # a vacuum that deletes nothing would still add two commits to the log
            return len(table.vacuum(retention_hours, dry_run=False, enforce_retention_duration=False, full=True))
    except Exception as e:  # noqa: BLE001 - the export's outcome stands either way
        logging.getLogger(__name__).warning("%s: vacuum failed (%s); the export is committed, and the next export "
                                            "vacuums again", uri, str(e).splitlines()[0][:200])
        return 0


def _committed_anyway(uri: str, tag: str) -> bool:
    """Whether export `tag`'s commit is in the table's log; when the log cannot be read, assume it is (leaving a
    stray file to the next export's leftover removal is safe; deleting a committed version's files is not)."""
    try:
        return delta.committed_by(uri, tag)
    except Exception:  # noqa: BLE001 - any failure to read the log means "do not delete"
        return True


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
    from macrid.cluster import connect

    if not spec.local:
        connect()
    return raw(spec.input, vocab.select("item_idx", "item_id"), run_record["min_rating"], stage, spec.lake,
               spec.format, spec.user_col, spec.item_col, spec.rating_col, runner="local" if spec.local else "ray")


def _users(spec: ExportSpec, source: Source, run_record: dict, tag: str, progress: bool) -> dict[str, list[dict]]:
    """Ray Data over the user rows; actors compute and write. Returns each table's file records."""
    if spec.local:
        return _users_here(spec, source, run_record, tag, progress)
    import ray.data
    from tqdm import tqdm

    from macrid.cluster import connect

    connect()
    fs, _ = lake.resolve(spec.lake)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same batches on a re-run: identical content
    ctx.use_datasource_v2 = False  # (see ray_data.train_dataset)
    ctx.enable_progress_bars = False  # ours counts users; Ray Data's would print a status block every few seconds
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": ours
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
    from tqdm import tqdm

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
        from macrid.data.ray_data import lists_to_batch
        from macrid.output import represent

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


def components_table(user_ids: pa.Array, mu: torch.Tensor, share: torch.Tensor) -> pa.Table:
    """One row per (user, component): user_id, component, weight, dominant, mu."""
    B, K, D = mu.shape
    share_np = share.float().cpu().numpy()  # (B, K)
    dominant = share_np.argmax(1)  # (B,)
    flat = mu.float().cpu().numpy().reshape(-1)  # (B*K*D,)
    return pa.table({
        "user_id": pa.array(user_ids).take(pa.array(np.repeat(np.arange(B), K))),
        "component": pa.array(np.tile(np.arange(K, dtype=np.int16), B)),
        "weight": pa.array(share_np.reshape(-1)),
        "dominant": pa.array(np.tile(np.arange(K), B) == np.repeat(dominant, K)),
        "mu": pa.ListArray.from_arrays(pa.array(np.arange(0, B * K * D + 1, D, dtype=np.int32)), pa.array(flat)),
    })


def recommendations_table(user_ids: pa.Array, item_ids: pa.Array, out) -> pa.Table:
    """One row per (user, rank): user_id, rank (1 = best), item_id, score (log A_ui), concept."""
    B, N = out.top_items.shape
    keep = out.top_valid.cpu().numpy().reshape(-1)  # (B*N,) a user's own items are never recommended
    return pa.table({
        "user_id": pa.array(user_ids).take(pa.array(np.repeat(np.arange(B), N)[keep])),
        "rank": pa.array(np.tile(np.arange(1, N + 1, dtype=np.int32), B)[keep]),
        "item_id": item_ids.take(pa.array(out.top_items.cpu().numpy().reshape(-1)[keep])),
        "score": pa.array(out.top_scores.float().cpu().numpy().reshape(-1)[keep]),
        "concept": pa.array(out.top_concepts.cpu().numpy().reshape(-1).astype(np.int16)[keep]),
    })


def _items(spec: ExportSpec, model: MacridVAE, vocab: pl.DataFrame, tag: str) -> tuple[list[dict], list[dict]]:
    """Item concepts chunk by chunk, and the prototypes; written, not committed."""
    from macrid.output import represent

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
        table = pa.table({
            "item_id": ids.slice(lo, hi - lo), "title": titles.slice(lo, hi - lo),
            "concept": pa.array(concept.astype(np.int16)), "probability": pa.array(c.max(1)),
            "probabilities": _lists(c), "h": _lists(h)})
        if bias is not None:
            table = table.append_column("bias", pa.array(bias.float().cpu().numpy()))
        files.append(delta.write_file(uri, spec.date, table, tag))
    m = model.m.detach().float().cpu().numpy()  # (K, D)
    prototypes = pa.table({"concept": pa.array(np.arange(model.K, dtype=np.int16)), "m": _lists(m),
                           "items": pa.array(per_concept)})
    return files, [delta.write_file(export_uri(spec.lake, spec.name, "prototypes"), spec.date, prototypes, tag)]


def _lists(x: np.ndarray) -> pa.ListArray:
    """(R, C) float32 -> list<float32> column of R rows."""
    R, C = x.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, R * C + 1, C, dtype=np.int32)),
                                    pa.array(np.ascontiguousarray(x, dtype=np.float32).reshape(-1)))


def _remove(uri: str) -> None:
    fs, path = lake.resolve(uri)
    try:
        fs.delete_dir(path)
    except (OSError, FileNotFoundError):
        pass


def _list(t: pa.DataType) -> pa.DataType:
    return pa.list_(t)


SCHEMAS = {
    "user_components": lambda item_t, user_t: pa.schema([
        ("user_id", user_t), ("component", pa.int16()), ("weight", pa.float32()), ("dominant", pa.bool_()),
        ("mu", _list(pa.float32()))]),
    "recommendations": lambda item_t, user_t: pa.schema([
        ("user_id", user_t), ("rank", pa.int32()), ("item_id", item_t), ("score", pa.float32()),
        ("concept", pa.int16())]),
    "item_concepts": lambda item_t, user_t: pa.schema([
        ("item_id", item_t), ("title", pa.string()), ("concept", pa.int16()), ("probability", pa.float32()),
        ("probabilities", _list(pa.float32())), ("h", _list(pa.float32()))]),
    "prototypes": lambda item_t, user_t: pa.schema([
        ("concept", pa.int16()), ("m", _list(pa.float32())), ("items", pa.int64())]),
}
