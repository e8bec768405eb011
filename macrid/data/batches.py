"""Prepared dataset -> CSR user bags -> sparse batches. Never imports the model.

A batch of B users is `indices (N,)` item ids and `offsets (B+1,)`, the layout
of `torch.nn.functional.embedding_bag`: user b owns indices[offsets[b]:offsets[b+1]].
No dense B x M matrix is ever built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from macrid.data import lake
from macrid.errors import DataError
from macrid.data.layout import dataset_uri, load_meta, snapshot_uri  # noqa: F401  (load_meta, snapshot_uri: re-exported)


@dataclass(frozen=True)
class CSR:
    """Users' item bags: row r holds indices[indptr[r]:indptr[r+1]]."""

    indptr: np.ndarray  # (U+1,) int64
    indices: np.ndarray  # (N,) int64

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def from_lists(cls, column: pa.ChunkedArray) -> "CSR":
        arr = column.combine_chunks()
        offsets = np.asarray(arr.offsets, dtype=np.int64)
        values = np.asarray(arr.values, dtype=np.int64)
        return cls(offsets - offsets[0], values[offsets[0]:offsets[-1]])

    def item_counts(self, n_items: int) -> np.ndarray:
        """(M,) how many bags hold each item: the popularity of the training set."""
        return np.bincount(self.indices, minlength=n_items)

    def take(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows -> (indices (N,), offsets (B+1,)) as int64 tensors."""
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lengths = ends - starts
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # gather all rows' spans at once: position p of the batch maps to starts[row] + (p - offsets[row])
        row_of = np.repeat(np.arange(len(rows)), lengths)
        idx = self.indices[starts[row_of] + np.arange(offsets[-1]) - offsets[:-1][row_of]]
        return torch.from_numpy(idx), torch.from_numpy(offsets)


@dataclass(frozen=True)
class HeldOut:
    """Validation or test users: fold-in bags are the input, held-out bags the targets."""

    user_idx: np.ndarray  # (U,)
    foldin: CSR
    heldout: CSR


@dataclass(frozen=True)
class Dataset:
    meta: dict
    n_items: int
    train: CSR | None  # None when the training bags are streamed instead
    val: HeldOut
    test: HeldOut


def load_dataset(lake_root: str, name: str, with_train: bool = True, version: str = "") -> Dataset:
    """The held-out splits, and the training bags unless `with_train` is False (Ray Data streams them).

    version: the snapshot to read ("" = the current one)."""
    meta = load_meta(lake_root, name, version)
    uri = dataset_uri(lake_root, name, meta.get("version", ""))
    train = CSR.from_lists(lake.read_table(f"{uri}/train", ["items"])["items"]) if with_train else None
    return Dataset(meta, int(meta["n_items"]), train, _heldout(f"{uri}/val"), _heldout(f"{uri}/test"))


def load_train_share(lake_root: str, name: str, rank: int, world: int, version: str = "") -> CSR:
    """This rank's share of the training bags: rows rank, rank + W, rank + 2W, ... of the train table.

    Reads record batch by record batch, so a rank holds its 1/W share plus one batch, never the
    whole training set. A shard that cannot be read is named in the error.
    """
    parts, seen = [], 0
    for batch in _train_batches(lake_root, name, version, 65_536):
        first = (rank - seen) % world  # the first row of this batch that belongs to this rank
        parts.append(batch.column(0).take(pa.array(np.arange(first, batch.num_rows, world))))
        seen += batch.num_rows
    return CSR.from_lists(pa.chunked_array(parts) if parts else pa.chunked_array([], pa.list_(pa.int32())))


def train_chunks(lake_root: str, name: str, version: str = "", rows: int = 65_536) -> Iterator[CSR]:
    """All the training bags, `rows` users at a time (memory: one chunk at any size)."""
    for batch in _train_batches(lake_root, name, version, rows):
        yield CSR.from_lists(pa.chunked_array([batch.column(0)]))


def _train_batches(lake_root: str, name: str, version: str, rows: int) -> Iterator[pa.RecordBatch]:
    """The train table's `items` column, shard by shard in name order, `rows` rows at a time; checksums verified,
    and a shard that cannot be read named."""
    uri = f"{snapshot_uri(lake_root, name, version)}/train"
    fs, _ = lake.resolve(uri)
    files = lake.list_parquet(uri)
    if not files:
        raise DataError(f"{uri}: no Parquet files found; run jobs/prepare.py to build the dataset")
    for path in files:
        with lake.explained(uri), unreadable_shard(lake.join(uri, path.rsplit("/", 1)[-1])):
            shard = pq.ParquetFile(path, filesystem=fs, page_checksum_verification=True)
            yield from shard.iter_batches(batch_size=rows, columns=["items"])


@contextlib.contextmanager
def unreadable_shard(uri: str) -> Iterator[None]:
    """A corrupt or truncated Parquet shard -> a DataError that names it and says what to do."""
    try:
        yield
    except (pa.ArrowInvalid, pa.ArrowIOError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(f"{uri}: cannot read this training shard ({str(e).splitlines()[0][:200]}); restore it or "
                        "re-run jobs/prepare.py --overwrite, then resume the run with --resume") from None


def item_counts(lake_root: str, name: str, version: str = "") -> np.ndarray | None:
    """Training interactions per item (M,) from the items table; None for datasets prepared before the
    column existed (then the training bags must be counted)."""
    t = lake.read_table(f"{snapshot_uri(lake_root, name, version)}/items")
    if "train_count" not in t.column_names:
        return None
    return t.sort_by("item_idx")["train_count"].to_numpy()


def _heldout(uri: str) -> HeldOut:
    t = lake.read_table(uri)
    if t.num_rows == 0:
        raise DataError(f"{uri}: the split is empty; re-run jobs/prepare.py with a larger --heldout")
    return HeldOut(t["user_idx"].to_numpy(), CSR.from_lists(t["foldin"]), CSR.from_lists(t["heldout"]))


def iter_batches(
    csr: CSR, batch_size: int, rng: np.random.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (indices (N,), offsets (B+1,)); users shuffled when `rng` is given."""
    order = rng.permutation(csr.n_rows) if rng is not None else np.arange(csr.n_rows)
    for start in range(0, len(order), batch_size):
        yield csr.take(order[start:start + batch_size])
