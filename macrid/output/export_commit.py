"""One export's transaction over its Delta tables: check, commit, roll back, vacuum.

    check      every table's columns against what it holds, before any commit (a mismatch commits nothing)
    commit     one commit per table that replaces the date's partition, under the name's lease; the manifest
               (macrid/output/manifest.py) last, which makes the date's tables one export for readers
    roll back  on failure, this export's uncommitted files deleted, and never a committed version's
    vacuum     after the lease is released: files no version of the retention window uses

The data files themselves are written before (by the export's workers and the driver), uncommitted; a
reader sees nothing of them until their table's commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pyarrow as pa

from macrid.data import lake
from macrid.data.lease import Lease
from macrid.output import delta, manifest

log = logging.getLogger(__name__)


class Transaction:
    """The commits of export `tag` for `date`; uri_of(table) is each table's Delta URI."""

    def __init__(self, uri_of: Callable[[str], str], date: str, tag: str, lease: Lease):
        self.uri_of, self.date, self.tag, self.lease = uri_of, date, tag, lease
        self.committed: list[str] = []  # tables whose commit is in their log, in order

    def commit(self, schemas: dict[str, pa.Schema], files: dict[str, list[dict]], summary: dict) -> dict[str, int]:
        """Check every table, commit each (the manifest last), and return each table's new version. `summary` is
        each commit's metadata; tables whose commit left some of this export's files out (a lost actor's) get a
        count under summary["unheld_removed"]."""
        for table, schema in schemas.items():  # every table before any commit
            delta.check_schema(self.uri_of(table), schema)
        versions: dict[str, int] = {}
        for table, schema in schemas.items():
            if table == manifest.TABLE:
                continue
            uri = self.uri_of(table)
            self.lease.check()  # a writer that lost its lease (it stalled past the expiry) must not commit
            versions[table] = delta.commit(uri, schema, files[table], self.date, summary)
            self.committed.append(table)
            removed = delta.remove_unheld(uri, self.date, self.tag)  # this export's files its commit lacks
            if removed:
                summary.setdefault("unheld_removed", {})[table] = len(removed)
        summary["versions"] = dict(versions)
        uri = self.uri_of(manifest.TABLE)
        listing = manifest.rows(versions, {t: sum(f["rows"] for f in files[t]) for t in versions}, summary)
        self.lease.check()
        versions[manifest.TABLE] = delta.commit(uri, manifest.SCHEMA,
                                                [delta.write_file(uri, self.date, listing, self.tag)], self.date,
                                                summary)
        self.committed.append(manifest.TABLE)
        summary["versions"][manifest.TABLE] = versions[manifest.TABLE]
        return versions

    def roll_back(self, tables: tuple[str, ...]) -> None:
        """Delete this export's files of every table whose commit did not happen; committed ones keep theirs."""
        for table in tables:
            uri = self.uri_of(table)
            # a table whose commit reached its log (even if what followed it raised) keeps its files
            if table not in self.committed and not _committed_anyway(uri, self.tag):
                delta.delete_uncommitted(uri, self.date, self.tag)


def vacuum(uri: str, retention_hours: int) -> int:
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
        log.warning("%s: vacuum failed (%s); the export is committed, and the next export vacuums again", uri,
                    str(e).splitlines()[0][:200])
        return 0


def _committed_anyway(uri: str, tag: str) -> bool:
    """Whether export `tag`'s commit is in the table's log; when the log cannot be read, assume it is (leaving a
    stray file to the next export's leftover removal is safe; deleting a committed version's files is not)."""
    try:
        return delta.committed_by(uri, tag)
    except Exception:  # noqa: BLE001 - any failure to read the log means "do not delete"
        return True
