"""The raw formats macrid reads: their names (one registry), how a path's format is told, and the small
single-file formats parsed whole (MovieLens ml-100k `u.data`, ml-1m `ratings.dat` plain or gzipped, with or
without timestamps, ml-20m `ratings.csv`, the Netflix Prize `training_set/`, LightGCN adjacency lists), with
the item metadata they ship (titles, genres; evaluation only).

Parquet/CSV tables and Delta tables are streamed by `raw_input.py`; `readers.py` reads any source whole.
Nothing here imports either, so both import this.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from macrid.errors import DataError

SMALL_FORMATS = ("ml-100k", "ml-1m", "ml-20m", "netflix", "adjacency")  # local files, parsed whole
STREAMED_FORMATS = ("table", "delta")  # Parquet/CSV files or folders, Delta tables: read in place, streamed
FORMATS = ("auto", *SMALL_FORMATS, *STREAMED_FORMATS)  # --format's choices
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


def local_disk_only(uri: str, fmt: str) -> DataError:
    """The error for a small format named on object storage."""
    return DataError(f"{uri}: the {fmt} format is read from local disk only (its files are small and parsed "
                     "whole); copy them down first, or store the interactions as Parquet or CSV, which prepare "
                     "reads in place from S3")


def parse_small(path: Path, fmt: str) -> RawData:
    """One of SMALL_FORMATS, parsed whole from local disk."""
    return {"ml-100k": _read_ml100k, "ml-1m": _read_ml1m, "ml-20m": _read_ml20m, "netflix": _read_netflix,
            "adjacency": _read_adjacency}[fmt](path)


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
