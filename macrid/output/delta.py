"""Delta Lake tables written the way a distributed job writes them: many files, one commit.

Writers (Ray Data actors, or the driver) put Parquet data files into the table's folder under
`dt=<date>/`, each named uniquely; nothing reads them yet, because a Delta table is what its log
says, not what its folder holds. The driver then commits all files of a table as one transaction
that replaces the date's partition (`mode="overwrite"` with a `dt` partition filter). So:

- a crash before the commit leaves the previous version as it was, and the files it wrote are
  orphans that no reader sees: a failed export deletes its own (`delete_uncommitted`), and those of a
  killed one go with the vacuum once older than its retention window (never another export's files
  by name: one that is still writing them would lose them);
- a table written under an older schema whose columns only need widening (rank int16 -> int32) is
  rewritten once, in one commit, before the new partition (`widen`); earlier versions stay readable;
- a re-run for the same date replaces that date's partition and nothing else;
- every commit carries our metadata (checkpoint, input snapshot, counts, timings, schema version),
  readable with `DeltaTable(uri).history()`.

On S3, commits use conditional writes (`conditional_put = "etag"`), so two writers cannot both
win the same log entry: the loser fails instead of overwriting. Stores without conditional
writes need a single writer per table (or a DynamoDB lock, which we do not configure).
"""

from __future__ import annotations

import json
import os
import time
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Schema, write_deltalake
from deltalake.transaction import AddAction, create_table_with_add_actions

from macrid.data import lake
from macrid.errors import DataError

PARTITION = "dt"


def table_uri(uri: str) -> str:
    """A lake URI as deltalake takes it: s3://... as is, a local path absolute."""
    return uri if lake.is_s3(uri) else os.path.abspath(uri.removeprefix("file://"))


def open_table(uri: str, version: int | None = None):
    """The Delta table at uri (at a version), or None when there is none yet."""
    if not DeltaTable.is_deltatable(table_uri(uri), lake.delta_storage_options(uri)):
        return None
    return DeltaTable(table_uri(uri), version=version, storage_options=lake.delta_storage_options(uri))


def write_file(uri: str, date: str, table: pa.Table, tag: str) -> dict:
    """One data file of the `dt=date` partition, not yet committed. Returns its add record.

    `table` holds the data columns only: the partition column lives in the path and the log.
    `tag` (the export's id) names the file, so a failed export's files can be found and deleted."""
    rel = f"{PARTITION}={date}/part-{tag}-{uuid.uuid4().hex[:12]}.parquet"
    fs, root = lake.resolve(uri)
    path = f"{root}/{rel}"
    with lake.explained(uri):
        if not lake.is_s3(uri):
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, path, filesystem=fs, compression="zstd")
        size = fs.get_file_info(path).size
    return {"path": rel, "size": int(size), "rows": table.num_rows, "date": date}


def commit(uri: str, schema: pa.Schema, files: list[dict], date: str, metadata: dict) -> int:
    """Make `files` the whole `dt=date` partition in one transaction (creating the table if needed).

    schema: the data columns; the table's schema is it plus `dt: string`. Returns the new version."""
    full = schema.append(pa.field(PARTITION, pa.string()))
    now = int(time.time() * 1000)
    actions = [AddAction(f["path"], f["size"], {PARTITION: date}, now, True, json.dumps({"numRecords": f["rows"]}))
               for f in files]
    props = CommitProperties(custom_metadata={"macrid": json.dumps(metadata, sort_keys=True)})
    table = open_table(uri)
    with lake.explained(uri):
        if table is None:
            create_table_with_add_actions(table_uri(uri), Schema.from_arrow(full), actions, mode="error", partition_by=[PARTITION],
                                          storage_options=lake.delta_storage_options(uri), commit_properties=props)
        else:
            check_schema(uri, schema)
            if widens(pa.schema(table.schema().to_arrow()), pa.schema(_delta_arrow(full))):
                widen(uri, full, metadata)
                table = open_table(uri)
            table.create_write_transaction(actions, "overwrite", full, partition_by=[PARTITION],
                                           partition_filters=[(PARTITION, "=", date)], commit_properties=props)
    return open_table(uri).version()


def check_schema(uri: str, schema: pa.Schema) -> None:
    """Refuse, before anything is committed anywhere, a table whose columns this export cannot write: the same
    columns (or the same with narrower integers, which the commit widens) or a table that does not exist yet."""
    table = open_table(uri)
    if table is None:
        return
    current = pa.schema(table.schema().to_arrow())
    target = pa.schema(_delta_arrow(schema.append(pa.field(PARTITION, pa.string()))))
    if current != target and not widens(current, target):
        added, missing = sorted(set(target.names) - set(current.names)), sorted(set(current.names) - set(target.names))
        raise DataError(
            f"{uri}: the table's columns differ from this export's (this export adds {added or 'none'}, lacks "
            f"{missing or 'none'}; table: {current.names}); nothing was committed. Export to a new --name, or move "
            "the old table away")


def committed_by(uri: str, tag: str) -> bool:
    """Whether a commit of export `tag` is in the table's log: after a commit whose answer was lost (an ambiguous
    PUT, an error reading the version back), its files belong to a version and must never be deleted."""
    table = open_table(uri)
    if table is None:
        return False
    for entry in table.history():
        try:
            if json.loads(entry.get("macrid", "{}")).get("export_id") == tag:
                return True
        except ValueError:
            continue
    return False


def delete_files(uri: str, files: list[dict]) -> None:
    """Remove uncommitted files (a failed export's). Best effort: `vacuum` removes whatever is left."""
    fs, root = lake.resolve(uri)
    for f in files:
        try:
            fs.delete_file(f"{root}/{f['path']}")
        except OSError:
            pass


def last_commit(uri: str) -> dict:
    """Our metadata of the table's latest commit that has it (a vacuum's commits do not); {} if none."""
    table = open_table(uri)
    if table is None:
        return {}
    for entry in table.history():
        if "macrid" in entry:
            return json.loads(entry["macrid"])
    return {}


def _delta_arrow(schema: pa.Schema) -> pa.Schema:
    """What deltalake reports back for an Arrow schema we commit (its own type mapping)."""
    return Schema.from_arrow(schema).to_arrow()


def delete_uncommitted(uri: str, date: str, tag: str) -> None:
    """Remove the files a failed export (`tag`) wrote into the `dt=date` partition before its commit."""
    fs, root = lake.resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(f"{root}/{PARTITION}={date}", allow_not_found=True))
    except OSError:
        return
    delete_files(uri, [{"path": f"{PARTITION}={date}/{i.base_name}"} for i in infos
                       if i.base_name.startswith(f"part-{tag}-")])


def widens(current: pa.Schema, target: pa.Schema) -> bool:
    """True when `target` has `current`'s columns, in order, and differs only by wider integer types."""
    if current.names != target.names or current == target:
        return False
    for a, b in zip(current, target, strict=True):
        if a.type == b.type:
            continue
        if not (pa.types.is_signed_integer(a.type) and pa.types.is_signed_integer(b.type)
                and b.type.bit_width > a.type.bit_width):
            return False
    return True


def widen(uri: str, full: pa.Schema, metadata: dict) -> int:
    """Rewrite the whole table with `full`'s (wider) column types, in one overwrite commit; streamed batch by
    batch. Readers see the old version or the new one; time travel to the old versions keeps working."""
    table = open_table(uri)
    old = pa.schema(table.schema().to_arrow())
    target = pa.schema(_delta_arrow(full))
    batches = (b.cast(target) for b in table.to_pyarrow_dataset().to_batches(columns=target.names))
    reader = pa.RecordBatchReader.from_batches(target, batches)
    note = {"migration": f"columns widened: {[f'{a.name} {a.type}->{b.type}' for a, b in zip(old, target) if a.type != b.type]}",
            "schema_version": metadata.get("schema_version"), "export_id": metadata.get("export_id")}
    with lake.explained(uri):
        write_deltalake(table_uri(uri), reader, mode="overwrite", schema_mode="overwrite", partition_by=[PARTITION],
                        storage_options=lake.delta_storage_options(uri) or None,
                        commit_properties=CommitProperties(custom_metadata={"macrid": json.dumps(note, sort_keys=True)}))
    return open_table(uri).version()


def remove_unheld(uri: str, date: str, tag: str) -> list[str]:
    """Delete the data files in `dt=date` named by export `tag` that its version does not hold: a batch whose
    actor died with its node is computed again by another, and the dead one's files were never committed. Call
    it after `tag`'s commit. Only this export's own files are touched: another export's files, in flight or
    left by a killed one, are the vacuum's (by age), never this cleanup's. Returns the removed paths."""
    table = open_table(uri)
    if table is None:
        return []
    current = {u.rsplit("/", 1)[-1] for u in table.file_uris()}
    fs, root = lake.resolve(uri)
    with lake.explained(uri):
        infos = fs.get_file_info(pafs.FileSelector(f"{root}/{PARTITION}={date}", allow_not_found=True))
    unheld = [f"{PARTITION}={date}/{i.base_name}" for i in infos
              if i.type == pafs.FileType.File and i.base_name.startswith(f"part-{tag}-") and i.base_name not in current]
    delete_files(uri, [{"path": p} for p in unheld])
    return unheld
