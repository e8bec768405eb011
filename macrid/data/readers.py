"""Readers for raw interaction files -> one polars frame (user_id, item_id, rating).

Supported: MovieLens ml-100k `u.data`, ml-1m `ratings.dat` (plain or gzipped,
with or without timestamps), ml-20m `ratings.csv`, the Netflix Prize
`training_set/` folder, and any Parquet/CSV table whose column names the user
gives. Item metadata (titles, genres) is read where the format has it; it is
kept for evaluation only.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from macrid.errors import DataError

FORMATS = ("auto", "ml-100k", "ml-1m", "ml-20m", "netflix", "adjacency", "table")
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]


@dataclass(frozen=True)
class RawData:
    """Interactions plus optional item metadata, as read from one source."""

    interactions: pl.DataFrame  # user_id, item_id, rating (Float64, null when the source has none)
    items: pl.DataFrame | None  # item_id, title, genres (list[str]); evaluation only
    source: str
    format: str


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        if (path / "u.data").exists():
            return "ml-100k"
        if _ml1m_ratings_file(path) is not None:
            return "ml-1m"
        if (path / "ratings.csv").exists():
            return "ml-20m"
        if name == "training_set" or (path / "training_set").is_dir():
            return "netflix"
        if _adjacency_files(path):
            return "adjacency"
        if any(p.suffix in (".parquet", ".csv") for p in path.iterdir()):
            return "table"
    elif name == "u.data":
        return "ml-100k"
    elif name.endswith((".dat", ".dat.gz")) and "rating" in name:
        return "ml-1m"
    elif name == "ratings.csv":
        return "ml-20m"
    elif name.endswith((".parquet", ".csv", ".csv.gz")):
        return "table"
    raise DataError(
        f"{path}: cannot tell its format from the name; pass --format with one of {FORMATS[1:]}"
    )


def read_raw(
    path: str | Path,
    fmt: str = "auto",
    user_col: str = "user_id",
    item_col: str = "item_id",
    rating_col: str | None = None,
) -> RawData:
    if str(path).startswith("s3://") and fmt in ("auto", "table"):
        return _read_table(str(path), user_col, item_col, rating_col)
    if str(path).startswith("s3://"):
        raise DataError(f"{path}: the {fmt} format is read from local disk only (its files are small and "
                        "parsed whole); copy them down first, or store the interactions as Parquet or CSV, "
                        "which prepare reads in place from S3")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; check the --input path")
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r} is unknown; use one of {FORMATS}")
    if fmt == "auto":
        fmt = detect_format(path)
    reader = {
        "ml-100k": _read_ml100k,
        "ml-1m": _read_ml1m,
        "ml-20m": _read_ml20m,
        "netflix": _read_netflix,
        "adjacency": _read_adjacency,
    }.get(fmt)
    if reader is not None:
        return reader(path)
    return _read_table(str(path), user_col, item_col, rating_col)


def read_item_metadata(path: str | Path, fmt: str) -> pl.DataFrame | None:
    """The item metadata (item_id, title, genres) that a single-file format ships beside its ratings, read
    without the ratings; None when the format or the folder has none."""
    if str(path).startswith("s3://"):
        return None  # object-storage input gets its metadata from --items
    path = Path(path)
    if fmt == "ml-100k":
        return _items_ml100k(path / "u.data" if path.is_dir() else path)
    if fmt == "ml-1m":
        data = _ml1m_ratings_file(path) if path.is_dir() else path
        return _items_ml1m(data) if data is not None else None
    if fmt == "ml-20m":
        return _items_ml20m(path / "ratings.csv" if path.is_dir() else path)
    if fmt == "netflix":
        return _items_netflix(path)
    return None


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
    from macrid.data import lake
    from macrid.data.raw_input import Source, fragments

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


def _read_table(uri: str, user_col: str, item_col: str, rating_col: str | None) -> RawData:
    """Any Parquet or CSV file (or folder of them) with named user/item[/rating] columns, read as prepare
    reads it (raw_input.py: in name order, streamed, no local copy of object-storage input)."""
    from macrid.data.raw_input import Source, read_rows

    rows = read_rows(Source(uri, "table", user_col, item_col, rating_col))
    return RawData(rows, None, uri, "table")


def _items_frame(rows: list[tuple[int, str, list[str]]]) -> pl.DataFrame:
    """(item_id, title, genres) rows -> the item metadata frame."""
    return pl.DataFrame(rows, schema={"item_id": pl.Int64, "title": pl.String, "genres": pl.List(pl.String)},
                        orient="row")


def _read_delimited(file: Path, sep: str, names: list[str], encoding: str = "utf8") -> pl.DataFrame:
    """Read a header-less file whose separator may be several characters (ml-1m uses '::')."""
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rb") as f:
        text = f.read().decode(encoding)
    if sep != "\t" and len(sep) > 1:
        text = text.replace(sep, "\t")
    if not text.strip():
        raise DataError(f"{file}: file is empty")
    n_fields = text.split("\n", 1)[0].count("\t") + 1
    if n_fields < 3:
        raise DataError(f"{file}: expected at least user, item and rating fields separated by {sep!r}")
    df = pl.read_csv(
        io.StringIO(text), separator="\t", has_header=False, new_columns=names[:n_fields],
        schema_overrides={n: pl.String for n in names[:n_fields]}, quote_char=None,
    )
    return df


def _typed(file: Path, df: pl.DataFrame) -> pl.DataFrame:
    out = {}
    for col in ("user_id", "item_id", "rating"):
        cast = df[col].str.strip_chars().cast(pl.Float64 if col == "rating" else pl.Int64, strict=False)
        bad = cast.is_null()
        if bad.any():
            row = int(bad.arg_max())
            raise DataError(f"{file}: column {col!r} at line {row + 1} holds {df[col][row]!r}, expected a number")
        out[col] = cast
    return pl.DataFrame(out)


def _read_ml100k(path: Path) -> RawData:
    data = path / "u.data" if path.is_dir() else path
    df = _typed(data, _read_delimited(data, "\t", ["user_id", "item_id", "rating", "timestamp"]))
    return RawData(df, _items_ml100k(data), str(data), "ml-100k")


def _items_ml100k(data: Path) -> pl.DataFrame | None:
    item_file = data.parent / "u.item"
    if not item_file.exists():
        return None
    rows = []
    for line in item_file.read_bytes().decode("latin-1").splitlines():
        f = line.split("|")
        if len(f) < 24:
            continue
        genres = [g for g, flag in zip(ML100K_GENRES, f[5:24]) if flag == "1"]
        rows.append((int(f[0]), f[1], genres))
    return _items_frame(rows)


def _ml1m_ratings_file(folder: Path) -> Path | None:
    # The rebuilt ratings_user_movie_rating.dat.gz is complete; the *prefix* file is not.
    for name in ("ratings.dat", "ratings.dat.gz", "ratings_user_movie_rating.dat.gz", "ratings_user_movie_rating.dat"):
        if (folder / name).exists():
            return folder / name
    return None


def _read_ml1m(path: Path) -> RawData:
    data = _ml1m_ratings_file(path) if path.is_dir() else path
    if data is None:
        raise DataError(f"{path}: no ratings.dat(.gz) in this folder")
    df = _typed(data, _read_delimited(data, "::", ["user_id", "item_id", "rating", "timestamp"], "latin-1"))
    return RawData(df, _items_ml1m(data), str(data), "ml-1m")


def _items_ml1m(data: Path) -> pl.DataFrame | None:
    movies = data.parent / "movies.dat"
    if not movies.exists():
        return None
    rows = []
    for line in movies.read_bytes().decode("latin-1").splitlines():
        f = line.split("::")
        if len(f) == 3:
            rows.append((int(f[0]), f[1], f[2].split("|")))
    return _items_frame(rows)


def _read_ml20m(path: Path) -> RawData:
    data = path / "ratings.csv" if path.is_dir() else path
    df = pl.read_csv(data, schema_overrides={"userId": pl.String, "movieId": pl.String, "rating": pl.String})
    missing = [c for c in ("userId", "movieId", "rating") if c not in df.columns]
    if missing:
        raise DataError(f"{data}: missing column(s) {missing}; an ml-20m ratings.csv has userId,movieId,rating")
    df = _typed(data, df.rename({"userId": "user_id", "movieId": "item_id"}))
    return RawData(df, _items_ml20m(data), str(data), "ml-20m")


def _items_ml20m(data: Path) -> pl.DataFrame | None:
    movies = data.parent / "movies.csv"
    if not movies.exists():
        return None
    return pl.read_csv(movies).select(
        pl.col("movieId").cast(pl.Int64).alias("item_id"), pl.col("title"),
        pl.col("genres").str.split("|").alias("genres"),
    )


def _read_netflix(path: Path) -> RawData:
    folder = path / "training_set" if (path / "training_set").is_dir() else path
    files = sorted(folder.glob("mv_*.txt"))
    if not files:
        raise DataError(f"{folder}: no mv_*.txt files; point --input at the Netflix training_set folder")
    frames = []
    for f in files:
        text = f.read_text()
        head, _, body = text.partition("\n")
        if not head.rstrip().endswith(":"):
            raise DataError(f"{f}: first line should be '<MovieID>:', got {head[:40]!r}")
        df = pl.read_csv(io.StringIO(body), has_header=False, new_columns=["user_id", "rating", "date"],
                         schema_overrides={"user_id": pl.String, "rating": pl.String, "date": pl.String})
        df = df.with_columns(pl.lit(head.strip().rstrip(":")).alias("item_id"))
        frames.append(_typed(f, df))
    return RawData(pl.concat(frames), _items_netflix(path), str(folder), "netflix")


def _items_netflix(path: Path) -> pl.DataFrame | None:
    folder = path / "training_set" if (path / "training_set").is_dir() else path
    titles = (path if path.is_dir() else folder.parent) / "movie_titles.txt"
    if not titles.exists():
        return None
    rows = []
    for line in titles.read_bytes().decode("latin-1").splitlines():
        f = line.split(",", 2)
        if len(f) == 3:
            rows.append((int(f[0]), f[2], []))
    return _items_frame(rows)


def _adjacency_files(folder: Path) -> list[Path]:
    return [folder / n for n in ("train.txt", "train.txt.gz", "test.txt", "test.txt.gz") if (folder / n).exists()]


def _read_adjacency(path: Path) -> RawData:
    """LightGCN/NGCF adjacency lists: one line per user, a user id then item ids. train + test are merged,
    since the MultVAE protocol makes its own split."""
    files = _adjacency_files(path) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no train.txt / test.txt (optionally .gz) adjacency-list files")
    users, items = [], []
    for f in files:
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt") as fh:
            for n, line in enumerate(fh, 1):
                fields = line.split()
                if not fields:
                    continue
                try:
                    ids = [int(x) for x in fields]
                except ValueError:
                    raise DataError(f"{f}: line {n} holds a non-integer id: {line[:60]!r}") from None
                users.extend([ids[0]] * (len(ids) - 1))
                items.extend(ids[1:])
    df = pl.DataFrame({"user_id": users, "item_id": items},
                      schema={"user_id": pl.Int64, "item_id": pl.Int64}).with_columns(
        pl.lit(None, pl.Float64).alias("rating"))
    return RawData(df, None, str(path), "adjacency")
