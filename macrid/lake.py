"""The lake: URIs -> pyarrow filesystems, Parquet tables, JSON, atomic publication.

Every lake write goes through `staged_dir`: files are written under a hidden
sibling folder and renamed into place only when all of them are complete, so a
reader never sees a half-written dataset or table.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from macrid.errors import DataError


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """'/a/b', 'file:///a/b' or 'relative/dir' -> (filesystem, path)."""
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise DataError(f"{uri}: the {scheme}:// scheme is not supported yet; use a local path")
    fs, path = pafs.LocalFileSystem(), uri.removeprefix("file://")
    import os

    return fs, os.path.abspath(path)


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts if p)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(uri: str) -> dict[str, Any]:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        raise DataError(f"{uri} does not exist") from None


def write_json(uri: str, obj: Any) -> None:
    """Write a small JSON file atomically (temp file + rename)."""
    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True).encode())
    fs.move(tmp, path)


def write_parquet(uri: str, table: pa.Table) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs, compression="zstd")


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read every part-*.parquet file under a table folder, in name order."""
    fs, path = resolve(uri)
    infos = [
        i for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if i.base_name.endswith(".parquet")
    ]
    if not infos:
        raise DataError(f"{uri}: no Parquet files found; run jobs/prepare.py to build the dataset")
    tables = [pq.read_table(i.path, columns=columns, filesystem=fs) for i in sorted(infos, key=lambda i: i.path)]
    return pa.concat_tables(tables)


@contextlib.contextmanager
def staged_dir(uri: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a staging folder; on success rename it to `uri`, on failure delete it.

    The final rename is atomic on a local filesystem. An existing target is
    refused unless `overwrite`, in which case it is replaced only after the new
    content is complete.
    """
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound and not overwrite:
        raise DataError(f"{uri} already exists; pass --overwrite to replace it")
    parent, name = path.rsplit("/", 1)
    stage = f"{parent}/.{name}.staging-{uuid.uuid4().hex[:8]}"
    fs.create_dir(stage, recursive=True)
    try:
        yield stage
    except BaseException:
        fs.delete_dir(stage)
        raise
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        old = f"{parent}/.{name}.old-{uuid.uuid4().hex[:8]}"
        fs.move(path, old)
        fs.move(stage, path)
        fs.delete_dir(old)
    else:
        fs.move(stage, path)
