"""One consistent export per date: the manifest table, committed last, that names each table's version.

The four tables of an export are four Delta commits. Between them, a reader of the latest versions could see
tonight's `user_components` beside last night's `recommendations`. The export therefore commits a fifth, small
table last, `<lake>/exports/<name>/manifest` (partitioned by `dt`), with one row per table: the version that
holds this date's rows. Reading each table at its manifest version gives the export as one whole, and a
reader never sees a half-published date: until the manifest's commit, the manifest names the previous export
of the date (or nothing), whose versions stay readable (time travel) for the vacuum's retention window.

    versions(lake, "nightly", "2026-12-07")        {"user_components": 4, "recommendations": 4, ...}
    read(lake, "nightly", "recommendations", "2026-12-07")   that date's rows, as one export wrote them
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from macrid.data import lake, layout
from macrid.errors import DataError
from macrid.output import delta

TABLE = "manifest"
SCHEMA = pa.schema([("table", pa.string()), ("version", pa.int64()), ("export_id", pa.string()),
                    ("run", pa.string()), ("epoch", pa.int64()), ("rows", pa.int64())])


def rows(versions: dict[str, int], row_counts: dict[str, int], summary: dict) -> pa.Table:
    """The manifest rows of one export: each committed table, its version, and the export that wrote it."""
    tables = sorted(versions)
    return pa.table({
        "table": pa.array(tables, pa.string()),
        "version": pa.array([versions[t] for t in tables], pa.int64()),
        "export_id": pa.array([summary["export_id"]] * len(tables), pa.string()),
        "run": pa.array([summary["checkpoint"]["run"]] * len(tables), pa.string()),
        "epoch": pa.array([summary["checkpoint"]["epoch"]] * len(tables), pa.int64()),
        "rows": pa.array([row_counts[t] for t in tables], pa.int64()),
    }, schema=SCHEMA)


def versions(lake_root: str, name: str, date: str) -> dict[str, int]:
    """Each table's version that holds export `name`'s rows of `date`, as the manifest has it."""
    uri = layout.export_uri(lake_root, name, TABLE)
    table = delta.open_table(uri)
    if table is None:
        raise DataError(f"{uri}: no manifest, so export {name!r} has not completed a date yet (or was written "
                        "before macrid 0.4): run the export, or read the tables' latest versions directly")
    listing = _read(uri, table.version())
    found = listing.filter(pl.col(delta.PARTITION) == date)
    if found.height == 0:
        raise DataError(f"{uri}: export {name!r} has no completed export for {date}; the dates it has: "
                        f"{sorted(listing[delta.PARTITION].unique().to_list())}")
    return dict(zip(found["table"].to_list(), found["version"].to_list(), strict=True))


def read(lake_root: str, name: str, table: str, date: str) -> pl.DataFrame:
    """`date`'s rows of one table, at the version the manifest names: the tables read this way are one export."""
    pinned = versions(lake_root, name, date)
    if table not in pinned:
        raise DataError(f"export {name!r} of {date} has no {table!r} table (it has {sorted(pinned)}); "
                        "recommendations exist only for exports with --top-n > 0")
    return _read(layout.export_uri(lake_root, name, table), pinned[table]).filter(pl.col(delta.PARTITION) == date)


def _read(uri: str, version: int) -> pl.DataFrame:
    # polars, not deltalake's to_pyarrow_table: the latter can abort a short-lived process at exit
    # (docs/export-schema.md, "Prefer polars.read_delta")
    return pl.read_delta(delta.table_uri(uri), version=version, storage_options=lake.delta_storage_options(uri) or None)
