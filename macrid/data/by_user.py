"""Raw sources -> their clean rows, hash-partitioned by user: the read stage of `prepare` and of the export.

Each input file is one task: it streams the file in batches (raw_input.read_fragment), and every
FLUSH_ROWS clean rows writes them to `<scratch>/read/p<k>/<file>-<flush>.parquet`, k = the user's
partition. So task p of the next stage finds every row of its users under `read/p<p>/`, in input
order (file names sort by file number, then flush), and a read task's memory is FLUSH_ROWS rows.
"""

from __future__ import annotations

import math

import polars as pl

from macrid.data import lake
from macrid.data.raw_input import Fragment, Source, fragments, id_types, read_fragment
from macrid.data.stages import Scratch, Stages, partition_of
from macrid.errors import DataError

INPUT_BYTES_PER_PARTITION = 16 << 20  # ~5M interactions of zstd Parquet per user partition (~3.2 B each)
MAX_PARTITIONS = 4096
FLUSH_ROWS = 4 << 20  # a read task writes its partitions every FLUSH_ROWS clean rows (its memory bound)


def read_by_user(sources: list[Source], min_rating: float | None, partitions: int | None, stages: Stages,
                 scratch: Scratch) -> tuple[list[Fragment], int, list[dict]]:
    """Run the read stage. Returns the fragments, the number of user partitions and each file's counts
    (rows, ratings_missing, below_min_rating, kept, types, parts: the partitions it wrote to)."""
    frags = fragments(sources)
    P = partitions or partitions_for(frags)
    read = stages.run("read", _read_task, [
        {"task": f.index, "fragment": f.to_dict(), "partitions": P, "min_rating": min_rating,
         "scratch": scratch.uri("read")} for f in frags])
    _check_id_types(read)
    return frags, P, read


def partitions_for(frags: list[Fragment]) -> int:
    """User partitions from the input's size: each about INPUT_BYTES_PER_PARTITION of input."""
    total = sum(f.size for f in frags)
    return max(1, min(MAX_PARTITIONS, math.ceil(total / INPUT_BYTES_PER_PARTITION)))


def _read_task(spec: dict) -> dict:
    """One input file -> its clean rows, partitioned by user: read/p<k>/<file>-<flush>.parquet."""
    frag = Fragment(**spec["fragment"])
    scratch, P = spec["scratch"], spec["partitions"]
    totals = {"rows": 0, "ratings_missing": 0, "below_min_rating": 0, "kept": 0}
    buffered: list[pl.DataFrame] = []
    parts: set[int] = set()
    types = None
    flushes = 0

    def flush() -> None:
        nonlocal flushes
        df = pl.concat(buffered)
        df = df.with_columns(part=partition_of(df["user_id"], P))
        for (k,), part in df.partition_by("part", as_dict=True, include_key=False).items():
            lake.write_parquet(lake.join(scratch, f"p{k:05d}", f"{frag.index:06d}-{flushes:04d}.parquet"),
                               part.to_arrow(), scratch=True)
            parts.add(int(k))
        buffered.clear()
        flushes += 1

    rows = 0
    for frame, counts in read_fragment(frag, spec["min_rating"]):
        totals = {k: totals[k] + counts[k] for k in totals}
        if frame.height:
            t = id_types(frame)
            if types is not None and t != types:
                raise DataError(f"{frag.uri}: its IDs change type within the file ({types} then {t})")
            types = t
            buffered.append(frame)
            rows += frame.height
        if rows >= FLUSH_ROWS:
            flush()
            rows = 0
    if buffered:
        flush()
    return totals | {"types": types, "parts": sorted(parts), "uri": frag.uri}


def _check_id_types(read: list[dict]) -> None:
    """Every file's IDs must be of one type: integers in one shard and strings in another would never join."""
    seen: dict[str, str] = {}
    for r in read:
        if r["types"] is not None:
            seen.setdefault(r["types"], r["uri"])
    if len(seen) > 1:
        (t1, f1), (t2, f2) = list(seen.items())[:2]
        raise DataError(f"{f2}: its (user, item) IDs are {t2}, but {f1} has {t1}; the input's shards have "
                        "different schemas. Cast the ID columns to one type in every shard")


