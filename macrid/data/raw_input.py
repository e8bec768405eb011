"""Raw interaction sources -> fragments, and one fragment -> clean (user_id, item_id, pos) rows.

A source is what `--input` names: a Parquet/CSV file or folder (local or s3://), a Delta table, one
of the small single-file formats that `formats.py` parses (MovieLens, Netflix, adjacency lists), or
an in-memory frame. `fragments` lists its files on the driver (names and sizes only: no file is
opened there); `read_fragment` runs where the rows are, in a Ray task, and streams one file in
record batches, so a task's memory is one batch whatever the file's size.

`pos` is a row's place in the input: fragment number * 2^36 + its row in the fragment. The
protocol's "first occurrence" and "input order" (the reference notebook's pandas order) are the
order of `pos`, so the result does not depend on which task read which file, or in which order the
tasks ran. Files of a folder are taken in name order, sources in `--input` order.

Cleaning happens here, per batch: IDs must be non-null integers or strings (floats, lists and
uint64 values above the int64 range are refused with the file and the column); a rating column is
numeric, rows with a NaN or null rating are dropped and counted (never kept as positives), and
ratings below the threshold are dropped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import unquote

import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable

from macrid.data import lake
from macrid.data.formats import SMALL_FORMATS, STREAMED_FORMATS, detect_format, local_disk_only, parse_small
from macrid.errors import DataError

POS_SHIFT = 36  # rows per fragment < 2^36; fragments < 2^27
BATCH_ROWS = 1 << 20  # rows per record batch read at a time
TABLE_SUFFIXES = (".parquet", ".csv", ".csv.gz")


@dataclass(frozen=True)
class Source:
    """One --input: where it is, how to read it, and the prefix that keeps a union's IDs apart."""

    uri: str
    format: str = "auto"  # auto | table | delta | ml-100k | ml-1m | ml-20m | netflix | adjacency
    user_col: str = "user_id"
    item_col: str = "item_id"
    rating_col: str | None = None
    prefix: str = ""  # "<name>:" in a union of sources, else ""


@dataclass(frozen=True)
class Fragment:
    """One unit of reading: a file of a source (a small format's whole input is one fragment)."""

    index: int
    uri: str  # a file ("s3://..." or a local path)
    kind: str  # parquet | csv | <small format>
    size: int  # bytes, to size the shuffle
    user_col: str
    item_col: str
    rating_col: str | None
    prefix: str
    source: str = field(default="")

    def to_dict(self) -> dict:
        return asdict(self)


def sources_of(inputs: list[str], fmt: str = "auto", user_col: str = "user_id", item_col: str = "item_id",
               rating_col: str | None = None) -> list[Source]:
    """--input values -> Sources; a union of several prefixes each ID with its folder's name, so they must differ."""
    names = [i.rstrip("/").rsplit("/", 1)[-1] for i in inputs]
    if len(names) > 1 and len(set(names)) != len(names):
        raise DataError(f"the --input sources need distinct folder names to tell their ids apart; got {names}")
    return [Source(i, fmt, user_col, item_col, rating_col, prefix=f"{n}:" if len(names) > 1 else "")
            for i, n in zip(inputs, names)]


def fragments(sources: list[Source]) -> list[Fragment]:
    """Every file to read, in input order (sources in order, each folder's files in name order)."""
    out: list[Fragment] = []
    for src in sources:
        for uri, kind, size in _files(src):
            out.append(Fragment(len(out), uri, kind, size, src.user_col, src.item_col, src.rating_col,
                                src.prefix, src.uri))
    if len(out) >= 1 << (63 - POS_SHIFT):
        raise DataError(f"{len(out)} input files is more than this reader can number; merge small files first")
    return out


def _files(src: Source) -> list[tuple[str, str, int]]:
    fmt = src.format
    if fmt in SMALL_FORMATS and lake.is_s3(src.uri):
        raise local_disk_only(src.uri, fmt)
    if fmt == "auto" and not lake.is_s3(src.uri):
        fmt = _small_format(src.uri) or "auto"
    if fmt in SMALL_FORMATS:
        return [(src.uri, fmt, _size(src.uri))]
    fs, path = lake.resolve(src.uri)
    with lake.explained(src.uri):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{src.uri} does not exist; check the --input path")
        if info.type == pafs.FileType.File:
            return [(src.uri, _table_kind(src.uri), info.size)]
        delta = fs.get_file_info(f"{path}/_delta_log").type == pafs.FileType.Directory
        if fmt == "delta" or delta:
            return [(uri, "parquet", size) for uri, size in _delta_files(src.uri)]
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    scheme = "s3://" if lake.is_s3(src.uri) else ""
    files = sorted((i.path, i.size) for i in infos if i.type == pafs.FileType.File
                   and i.base_name.lower().endswith(TABLE_SUFFIXES)
                   and not any(part.startswith((".", "_")) for part in i.path[len(path):].split("/")))
    if not files:
        raise DataError(f"{src.uri}: folder holds no .parquet or .csv files; check the --input path "
                        f"or pass --format for MovieLens, Netflix or adjacency-list input")
    return [(scheme + p, _table_kind(p), size) for p, size in files]


def _small_format(uri: str) -> str | None:
    path = Path(uri)
    if not path.exists():
        raise DataError(f"{path} does not exist; check the --input path")
    try:
        fmt = detect_format(path)
    except DataError:
        return None
    return fmt if fmt in SMALL_FORMATS else None


def _size(uri: str) -> int:
    if os.path.isdir(uri):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(uri) for f in fs)
    return os.path.getsize(uri)


def _table_kind(path: str) -> str:
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    raise DataError(f"{path}: cannot tell its format from the name; pass --format with one of "
                    f"{STREAMED_FORMATS + SMALL_FORMATS}")


def _delta_files(uri: str) -> list[tuple[str, int]]:
    """The data files of a Delta table's current version and their sizes, from its log (`get_add_actions`: what
    ray.data.read_delta reads), so that its partitions follow the real sizes on S3 as on local disk. A table whose
    current version deletes rows through deletion vectors is refused: its files still hold those rows."""
    try:
        table = DeltaTable(uri, storage_options=lake.delta_storage_options(uri))
        actions = pa.table(table.get_add_actions(flatten=True))
    except Exception as e:  # deltalake raises its own TableNotFoundError, DeltaError, OSError
        raise DataError(f"{uri}: cannot be read as a Delta table ({type(e).__name__}: {e})") from None
    if _has_deletion_vectors(table):
        raise DataError(f"{uri}: its current version deletes rows through deletion vectors, which macrid does not "
                        "apply; rewrite the table without them (e.g. Spark: REORG TABLE ... APPLY (PURGE), or "
                        "deltalake's optimize.compact) and prepare again")
    root = lake.join(uri, "")  # add actions' paths are relative to the table's root
    out = []
    for path, size in zip(actions["path"].to_pylist(), actions["size_bytes"].to_pylist()):
        path = unquote(path)  # the log percent-encodes partition values (dt%3D2026-12-01)
        full = path if "://" in path or path.startswith("/") else f"{root.rstrip('/')}/{path}"
        out.append((full.removeprefix("file://"), int(size or 1)))
    return sorted(out)


def _has_deletion_vectors(table) -> bool:
    """Whether the table's current version deletes any row through a deletion vector (one that cannot be read
    counts as one: its rows cannot be known to be kept)."""
    if "deletionVectors" not in (table.protocol().reader_features or []):
        return False
    try:
        return any(batch.num_rows for batch in table.deletion_vectors())
    except Exception:  # noqa: BLE001 - a vector deltalake cannot decode still deletes rows
        return True


def read_fragment(frag: Fragment, min_rating: float | None) -> Iterator[tuple[pl.DataFrame, dict]]:
    """Clean batches (user_id, item_id, pos) of one fragment, each with its counts.

    user_id and item_id are Int64 when the column is an integer type (String with a union prefix),
    else String; the caller checks that every fragment agrees."""
    start = frag.index << POS_SHIFT
    for batch in _batches(frag):
        n = batch.height
        frame, counts = _clean(frag, batch, start, min_rating)
        start += n
        yield frame, counts


def read_rows(src: Source) -> pl.DataFrame:
    """Every row of one source in input order, in memory: user_id, item_id, rating (Float64, null without a
    rating column). Validated like read_fragment, not filtered; for small inputs (readers.read_raw)."""
    frames, start = [], 0
    for frag in fragments([src]):
        start = frag.index << POS_SHIFT
        for df in _batches(frag):
            rating = _ratings(frag, df["__rating"], start) if "__rating" in df.columns else \
                pl.Series("rating", [None] * df.height, pl.Float64)
            frames.append(pl.DataFrame({"user_id": _ids(frag, df[frag.user_col], frag.user_col, start),
                                        "item_id": _ids(frag, df[frag.item_col], frag.item_col, start),
                                        "rating": rating}))
            start += df.height
    if not frames:
        return pl.DataFrame(schema={"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float64})
    if len({(f["user_id"].dtype, f["item_id"].dtype) for f in frames}) > 1:
        raise DataError(f"{src.uri}: its files' ID columns have different types; cast them to one type")
    return pl.concat(frames)


def _batches(frag: Fragment) -> Iterator[pl.DataFrame]:
    """The fragment's rows in file order: user, item, rating (raw types), BATCH_ROWS at a time."""
    wanted = [frag.user_col, frag.item_col] + ([frag.rating_col] if frag.rating_col else [])
    if frag.kind in SMALL_FORMATS:
        df = parse_small(Path(frag.uri), frag.kind).interactions  # small files, parsed whole: user_id, item_id, rating
        df = df.rename({"user_id": frag.user_col, "item_id": frag.item_col, "rating": "__rating"})
        yield df if df["__rating"].null_count() < df.height else df.drop("__rating")  # implicit formats
        return
    if frag.size == 0:
        return  # a 0-byte file is an empty shard (counted in the input's files, no rows)
    fs, path = lake.resolve(frag.uri)
    try:
        with lake.explained(frag.uri):
            if frag.kind == "parquet":
                file = pq.ParquetFile(fs.open_input_file(path))
                names = file.schema_arrow.names
                _check_columns(frag, wanted, names)
                for rb in file.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
                    yield _polars(frag, rb)
            else:
                compression = "gzip" if path.lower().endswith(".gz") else None
                with fs.open_input_stream(path, compression=compression) as f:  # the header, from a small block
                    header = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16)).schema.names
                _check_columns(frag, wanted, header)
                with fs.open_input_stream(path, compression=compression) as f:
                    reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=64 << 20),
                                            convert_options=pacsv.ConvertOptions(
                                                include_columns=wanted, column_types={c: pa.string() for c in wanted}))
                    for rb in reader:
                        yield _polars(frag, rb.select(wanted))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise DataError(f"{frag.uri}: disappeared while it was read; re-run when the input is stable") from None
        raise DataError(f"{frag.uri}: cannot be read as {frag.kind} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); fix or remove the file") from None


def _polars(frag: Fragment, rb: pa.RecordBatch) -> pl.DataFrame:
    df = pl.from_arrow(rb)
    return df.rename({frag.rating_col: "__rating"}) if frag.rating_col else df


def _check_columns(frag: Fragment, wanted: list[str], names: list[str]) -> None:
    twice = sorted({c for c in wanted if names.count(c) > 1})
    if twice:  # which of the two would be read is the reader's choice: refuse rather than guess
        raise DataError(f"{frag.uri}: column(s) {twice} appear more than once in its header {names}; rename the "
                        "duplicates so that each column name is unique")
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataError(f"{frag.uri}: missing column(s) {missing}; it has {names}. "
                        "Name the columns with --user-col/--item-col/--rating-col")


def _clean(frag: Fragment, df: pl.DataFrame, start: int, min_rating: float | None) -> tuple[pl.DataFrame, dict]:
    users = _ids(frag, df[frag.user_col], frag.user_col, start)
    items = _ids(frag, df[frag.item_col], frag.item_col, start)
    out = pl.DataFrame({"user_id": users, "item_id": items,
                        "pos": pl.int_range(start, start + df.height, dtype=pl.Int64, eager=True)})
    counts = {"rows": df.height, "ratings_missing": 0, "below_min_rating": 0}
    if "__rating" in df.columns:
        rating = _ratings(frag, df["__rating"], start)
        missing = rating.is_null() | rating.is_nan()
        counts["ratings_missing"] = int(missing.sum())
        keep = ~missing
        if min_rating is not None:
            below = keep & (rating < min_rating)
            counts["below_min_rating"] = int(below.sum())
            keep = keep & ~below
        out = out.filter(keep)
    counts["kept"] = out.height
    return out, counts


def _ids(frag: Fragment, s: pl.Series, col: str, start: int) -> pl.Series:
    """IDs as Int64 or String (prefixed in a union), or a DataError naming the file, column and row."""
    nulls = s.null_count()
    if nulls:
        row = (start & ((1 << POS_SHIFT) - 1)) + int(s.is_null().arg_max())
        raise DataError(f"{frag.uri}: column {col!r} has {nulls} null ID(s), first at row {row}; drop or fill them")
    if s.dtype == pl.String and frag.kind == "csv":
        as_int = s.str.strip_chars().cast(pl.Int64, strict=False)
        s = as_int if as_int.null_count() == 0 else s  # a CSV column of integers is integer IDs ("01" is 1)
    if s.dtype.is_integer():
        if s.dtype == pl.UInt64 and s.max() > 2**63 - 1:
            raise DataError(f"{frag.uri}: column {col!r} holds {s.max()}, above the int64 range; "
                            "store the IDs as strings")
        s = s.cast(pl.Int64)
    elif s.dtype in (pl.String, pl.Categorical, pl.Enum):
        s = s.cast(pl.String)
    else:
        raise DataError(f"{frag.uri}: column {col!r} has type {s.dtype}; IDs must be integers or strings "
                        "(cast float IDs to integers, or pass the right --user-col/--item-col)")
    if frag.prefix:
        s = frag.prefix + s.cast(pl.String)
    return s.alias(col)


def _ratings(frag: Fragment, s: pl.Series, start: int) -> pl.Series:
    if s.dtype == pl.String:
        cast = s.str.strip_chars().cast(pl.Float64, strict=False)
        empty = s.is_null() | (s.str.strip_chars() == "")
        bad = cast.is_null() & ~empty & ~s.str.strip_chars().str.to_lowercase().is_in(["nan", "null", "na"])
        if bad.any():
            row = (start & ((1 << POS_SHIFT) - 1)) + int(bad.arg_max())
            value = s[int(bad.arg_max())]
            raise DataError(f"{frag.uri}: column {frag.rating_col!r} is not numeric: row {row} holds {value!r}; "
                            "fix the value or pass the right --rating-col")
        return cast
    if s.dtype == pl.Null:
        return s.cast(pl.Float64)
    if not s.dtype.is_numeric() or s.dtype == pl.Boolean:
        raise DataError(f"{frag.uri}: column {frag.rating_col!r} has type {s.dtype}, expected a number")
    return s.cast(pl.Float64)


def id_types(df: pl.DataFrame) -> str:
    """'<user type>/<item type>' of a cleaned frame, each int or string: every fragment must agree."""
    return "/".join("int" if df[c].dtype == pl.Int64 else "string" for c in ("user_id", "item_id"))
