"""Any raw source read whole, in memory: interactions -> one polars frame (user_id, item_id, rating), and
item tables (item_id, title, genres).

For small inputs and tests: the formats are `formats.py`'s (the small single-file ones parsed whole there),
Parquet/CSV files and Delta tables read as prepare reads them (`raw_input.read_rows`: in name order, no local
copy of object-storage input). Lake-scale input goes through prepare's stages instead.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from macrid.data import lake
from macrid.data.formats import FORMATS, RawData, detect_format, local_disk_only, parse_small
from macrid.data.raw_input import Source, fragments, read_rows
from macrid.errors import DataError


def read_raw(
    path: str | Path,
    fmt: str = "auto",
    user_col: str = "user_id",
    item_col: str = "item_id",
    rating_col: str | None = None,
) -> RawData:
    """Interactions and item metadata of one source, in memory. fmt: one of formats.FORMATS ("auto": from the
    name); the column names apply to tables."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r} is unknown; use one of {FORMATS}")
    if str(path).startswith("s3://"):
        if fmt in ("auto", "table", "delta"):
            return _read_table(str(path), "table" if fmt == "auto" else fmt, user_col, item_col, rating_col)
        raise local_disk_only(str(path), fmt)
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; check the --input path")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt in ("table", "delta"):
        return _read_table(str(path), fmt, user_col, item_col, rating_col)
    return parse_small(path, fmt)


def read_items(path: str | Path, item_col: str = "item_id") -> pl.DataFrame:
    """An item table (Parquet/CSV file or folder, local or s3://, read where it is): item_id plus optional
    title and genres (list of strings). O(items): the driver reads it whole.

    A title of another scalar type (an int, a date) is shown as text; a string `genres` column is split on
    "|" (MovieLens' convention: "Action|Comedy"); a list of numbers becomes a list of their texts. Other
    types (a nested title, a struct of genres) are refused, naming the file and the column."""
    frames = []
    for f, df in _table_files(str(path)):
        if item_col not in df.columns:
            raise DataError(f"{f}: missing column {item_col!r}; it has {df.columns}. Name it with --item-col")
        if df[item_col].null_count():
            raise DataError(f"{f}: column {item_col!r} has {df[item_col].null_count()} null item ids; drop them")
        df = df.rename({item_col: "item_id"})
        for col, dtype in (("title", pl.String), ("genres", pl.List(pl.String))):
            if col not in df.columns:
                df = df.with_columns(pl.lit(None, dtype).alias(col))
        df = df.with_columns(title=_as_title(df["title"], f), genres=_as_genres(df["genres"], f))
        frames.append(df.select("item_id", "title", "genres"))
    return pl.concat(frames)


def _as_title(col: pl.Series, where: str) -> pl.Series:
    if col.dtype.is_nested() or col.dtype == pl.Object:
        raise DataError(f"{where}: column 'title' is {col.dtype}; it must hold one text (or number) per item")
    return col.cast(pl.String)


def _as_genres(col: pl.Series, where: str) -> pl.Series:
    if col.dtype == pl.String:
        return col.str.split("|")
    if isinstance(col.dtype, pl.List) and not col.dtype.inner.is_nested():
        return col.cast(pl.List(pl.String))
    if col.dtype == pl.Null:
        return col.cast(pl.List(pl.String))
    raise DataError(f"{where}: column 'genres' is {col.dtype}; write a list of strings, or one string with the "
                    "genres separated by '|'")


def _table_files(uri: str) -> Iterator[tuple[str, pl.DataFrame]]:
    """Each Parquet/CSV file of `uri` (a file or a folder of them, local or s3://), read in place, or a
    DataError naming the file."""
    try:
        files = fragments([Source(uri, "table")])
    except DataError as e:
        raise DataError(str(e).replace("--input", "--items")) from None
    for frag in files:
        fs, p = lake.resolve(frag.uri)
        try:
            with lake.explained(frag.uri), fs.open_input_file(p) as f:
                data = f.read()
            df = pl.read_parquet(io.BytesIO(data)) if frag.kind == "parquet" else \
                pl.read_csv(io.BytesIO(data), infer_schema_length=10000)
        except (pl.exceptions.PolarsError, OSError, ValueError) as e:  # corrupt or unparsable file
            raise DataError(f"{frag.uri}: cannot be read as {frag.kind} ({type(e).__name__}: {e})") from None
        yield frag.uri, df


def _read_table(uri: str, fmt: str, user_col: str, item_col: str, rating_col: str | None) -> RawData:
    """Parquet or CSV files (or a Delta table) with named user/item[/rating] columns, read as prepare reads
    them (raw_input.py: in name order, streamed, no local copy of object-storage input)."""
    rows = read_rows(Source(uri, fmt, user_col, item_col, rating_col))
    return RawData(rows, None, uri, "table")
