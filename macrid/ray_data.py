"""Ray Data input: the lake's training shards -> shuffled CSR user batches, streamed to workers.

    read_parquet(<lake>/datasets/<name>/train/*.parquet)      one row per user: items list<int32>
      .randomize_block_order()                                  shards in a new order every epoch
      .map_batches(shuffled_csr_batches, batch_size=window)     users permuted within a window, cut
                                                                into CSR batches: one row = one batch
    Ray Train splits it across workers (streaming_split, equal=True, so every worker runs the same
    number of steps, which DDP requires) and each worker reads its shard with get_dataset_shard.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch

from macrid import lake
from macrid.prepare import dataset_uri

DATA_TASK_CPUS = 0.25
SHUFFLE_WINDOW = 100_000  # users permuted together; the lake's train shards hold 100k users each


def to_csr_batch(batch: pa.Table) -> pa.Table:
    """A batch of user rows -> one row holding the batch as CSR: indices (N,), offsets (B+1,), counts (B,)."""
    items = batch.column("items").combine_chunks()
    offsets = np.asarray(items.offsets, dtype=np.int64)
    indices = np.asarray(items.values, dtype=np.int32)[offsets[0]:offsets[-1]]
    offsets = offsets - offsets[0]
    return pa.table({
        "indices": pa.array([indices], type=pa.list_(pa.int32())),
        "offsets": pa.array([offsets], type=pa.list_(pa.int64())),
        "counts": pa.array([np.diff(offsets).astype(np.int32)], type=pa.list_(pa.int32())),
    })


def shuffled_csr_batches(window: pa.Table, per_worker_batch: int) -> pa.Table:
    """A window of user rows -> its rows in a fresh random order, cut into CSR batches (one per row).

    Unseeded on purpose: Ray Data re-executes the pipeline on every epoch, so every epoch draws a
    new order.
    """
    order = np.random.default_rng().permutation(window.num_rows)
    window = window.take(order)
    parts = [to_csr_batch(window.slice(lo, per_worker_batch)) for lo in range(0, window.num_rows, per_worker_batch)]
    return pa.concat_tables(parts)


def train_dataset(lake_root: str, name: str, per_worker_batch: int, shuffle_window: int = SHUFFLE_WINDOW):
    """The training input as a lazy Ray Dataset of CSR batches.

    Shuffling: block order is randomised and users are permuted within windows of `shuffle_window`
    users (a shuffle buffer); a window holds the whole training set up to that size. This replaces
    a global `random_shuffle`, whose all-to-all exchange cost ~7x the training compute per epoch
    on ML-1M (benchmarks/throughput.md).
    """
    import ray.data

    uri = lake.join(dataset_uri(lake_root, name), "train")
    fs, _ = lake.resolve(uri)
    # Fractional CPUs: the trainer's workers hold most of a small machine, and data tasks that each
    # want a whole CPU would wait forever (the deadlock in ENVIRONMENT.md).
    light = {"num_cpus": DATA_TASK_CPUS}
    ds = ray.data.read_parquet(lake.list_parquet(uri), filesystem=fs, **light).select_columns(["items"])
    window = max(shuffle_window // per_worker_batch, 1) * per_worker_batch
    return ds.randomize_block_order().map_batches(
        shuffled_csr_batches, batch_size=window, batch_format="pyarrow",
        fn_kwargs={"per_worker_batch": per_worker_batch}, **light)


def shard_batches(shard) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A worker's DataIterator of CSR rows -> (indices (N,), offsets (B+1,)) int64 tensors."""
    for row in shard.iter_batches(batch_size=1, batch_format="pyarrow", prefetch_batches=2):
        indices = np.asarray(row.column("indices")[0].values, dtype=np.int64)
        offsets = np.asarray(row.column("offsets")[0].values, dtype=np.int64)
        yield torch.from_numpy(indices), torch.from_numpy(offsets)
