"""Ray Data input: the lake's training shards, one row per user, streamed to the Ray Train workers.

    driver:  read_parquet(<lake>/datasets/<name>/train/*.parquet, columns=["items"])   rows = users
             Ray Train splits it across workers (streaming_split, equal=True: every worker gets the
             same number of users, so every worker runs the same number of steps, which DDP requires)
    worker:  shard.iter_batches(batch_format="pyarrow", local shuffle buffer seeded by (seed, epoch, rank),
             background prefetch) -> the Arrow list column's offsets and values, as tensors without a copy

There is no map stage: a list<int32> column already is CSR. Reads run as one task per file (the lake
writes 100,000-user shards), at a fraction of a CPU each so that they neither starve the trainers
nor wait forever on a small machine. Two ways to consume it (run.data):

- "stream": every epoch streams the shards again through the shuffle buffer; memory stays at the
  buffer and the prefetched batches, whatever the dataset's size.
- "cache": the first epoch reads the worker's share (1/W of the users) into CSR arrays and later
  epochs permute it in memory: no Ray Data work and no fixed cost after the first epoch.

`equal=True` drops at most W - 1 users per epoch, so that the shares are equal (counted in the
history as `users`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from macrid.data import lake
from macrid.data.batches import CSR, snapshot_uri, unreadable_shard
from macrid.errors import DataError
# ray: imported inside the functions that use them. Importing them is a start-up cost (Ray about 1.2 s on the
# development VM) that the paths without them (--help, in-process runs, tests) need not pay.

RAY_DATA_MODES = ("stream", "cache")  # the run.data values whose input goes through Ray Data
DATA_TASK_CPUS = 0.25
DATA_RESERVE_CPUS = 1.0  # CPUs a local Ray keeps free of trainers for Ray Data (launch.worker_resources)
SHUFFLE_BUFFER_USERS = 20_000  # users mixed by each worker's local shuffle buffer ("stream")
PREFETCH_BATCHES = 4


def train_dataset(lake_root: str, name: str, version: str = ""):
    """The training users of a version as a lazy Ray Dataset of rows `items: list<int32>`, one read task per file."""
    import ray.data

    uri = lake.join(snapshot_uri(lake_root, name, version), "train")
    fs, _ = lake.resolve(uri)
    files = lake.list_parquet(uri)
    for path in files:  # footers only (a few KB each): a torn shard is named here, not deep inside a read task
        with lake.explained(uri), unreadable_shard(lake.join(uri, path.rsplit("/", 1)[-1])):
            pq.read_metadata(path, filesystem=fs)
    ctx = ray.data.DataContext.get_current()  # captured by the dataset when it is created
    # Blocks in file order whatever finishes first, so that a seed fixes the order users reach a worker.
    ctx.execution_options.preserve_order = True
    # Ray 2.60's new read path runs a ListFiles task on every epoch that took 5.7 s of wall time (77 ms of
    # CPU) for one local file; the classic Parquet datasource starts an epoch in 0.2 s (ML-1M, 2 cores;
    # benchmarks/throughput.md). Our file list is explicit, so the listing stage has nothing to do.
    ctx.use_datasource_v2 = False
    return ray.data.read_parquet(files, filesystem=fs, num_cpus=DATA_TASK_CPUS).select_columns(["items"])


def lists_to_batch(items: pa.ChunkedArray | pa.Array) -> tuple[torch.Tensor, torch.Tensor]:
    """An Arrow list<int> column of B users -> (indices (N,), offsets (B+1,)) as int64 tensors.

    The offsets and values are read from the Arrow buffers without a copy; the only copy is the
    widening to int64 that embedding lookups want.
    """
    arr = items.combine_chunks() if isinstance(items, pa.ChunkedArray) else items
    offsets = arr.offsets.to_numpy(zero_copy_only=True)  # (B+1,) int32 (int64 for large_list), a view
    values = arr.values.to_numpy(zero_copy_only=True)  # (N_all,) int32, a view
    lo, hi = int(offsets[0]), int(offsets[-1])
    indices = torch.from_numpy(values[lo:hi].astype(np.int64))  # (N,)
    return indices, torch.from_numpy((offsets - lo).astype(np.int64))


def stream_batches(shard, per_worker_batch: int, seed: int, epoch: int, rank: int,
                   buffer_users: int = SHUFFLE_BUFFER_USERS, train_uri: str = ""
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of this worker's shard: seeded local shuffle, background prefetch, CSR tensors.

    train_uri: the pinned version's train folder; when a read fails, its shards are checked one by one
    so that the error names the one that broke (Ray Data's own error does not)."""
    batches = shard.iter_batches(batch_size=per_worker_batch, batch_format="pyarrow",
                                 prefetch_batches=PREFETCH_BATCHES,
                                 local_shuffle_buffer_size=max(buffer_users, per_worker_batch),
                                 local_shuffle_seed=_seed(seed, epoch, rank))
    try:
        for batch in batches:
            yield lists_to_batch(batch.column("items"))
    except (pa.ArrowInvalid, pa.ArrowIOError) as e:  # checked at the start of the run, so changed since
        for path in lake.list_parquet(train_uri) if train_uri else []:
            name = lake.join(train_uri, path.rsplit("/", 1)[-1])
            with unreadable_shard(name):  # raises the DataError that names the broken shard
                pq.ParquetFile(path, filesystem=lake.resolve(train_uri)[0], page_checksum_verification=True).read()
        raise DataError(f"{train_uri or 'a training shard'}: a shard became unreadable during epoch {epoch} "
                        f"({str(e).splitlines()[0][:200]}); restore it (or re-run jobs/prepare.py --overwrite "
                        "and start a new run) and continue with --resume") from None


class CachedShard:
    """"cache": the worker's share, read through Ray Data once, then permuted in memory every epoch."""

    def __init__(self, shard, per_worker_batch: int, seed: int, rank: int):
        self.shard, self.batch, self.seed, self.rank = shard, per_worker_batch, seed, rank
        self.csr: CSR | None = None

    def __call__(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.csr is None:
            chunks = [b.column("items") for b in self.shard.iter_batches(batch_size=None, batch_format="pyarrow",
                                                                         prefetch_batches=PREFETCH_BATCHES)]
            arrays = [c for ch in chunks for c in ch.chunks]
            self.csr = CSR.from_lists(pa.chunked_array(arrays) if arrays else pa.chunked_array([], pa.list_(pa.int32())))
            self.shard = None  # nothing more is read
        order = np.random.default_rng(_seed(self.seed, epoch, self.rank)).permutation(self.csr.n_rows)
        for start in range(0, len(order), self.batch):
            yield self.csr.take(order[start:start + self.batch])


def _seed(seed: int, epoch: int, rank: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
