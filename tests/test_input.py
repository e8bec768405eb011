"""Training input: every user once per epoch across workers, seeded orders, corrupt shards named.

The Ray Data tests run the workers' own functions (ray_data.stream_batches, CachedShard) on the
real streaming_split that Ray Train uses, consumed by two threads as two workers would.
"""

import contextlib
import threading
from collections import Counter

import pytest

from macrid.data.batches import load_dataset, load_train_share, snapshot_uri
from macrid.errors import DataError
from macrid.data.prepare import prepare
from macrid.data.split import Protocol
from macrid.data.synthetic import SyntheticSpec, generate
from macrid.training.train import memory_batches

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def lake_with_shards(tmp_path_factory, monkeypatch_module):
    """A dataset whose training users span three shards (the lake writes TRAIN_SHARD_USERS per file)."""
    import macrid.data.prepare

    monkeypatch_module.setattr(macrid.data.prepare, "TRAIN_SHARD_USERS", 200)
    lake = str(tmp_path_factory.mktemp("lake"))
    prepare(generate(SyntheticSpec(n_users=600, n_items=200, K=4, seed=5)), lake, "syn", Protocol())
    return lake


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def bags_of(batches) -> list[tuple]:
    """(indices, offsets) batches -> each user's bag as a sorted tuple of item ids."""
    out = []
    for idx, off in batches:
        idx, off = idx.numpy(), off.numpy()
        out += [tuple(sorted(idx[off[b]:off[b + 1]])) for b in range(len(off) - 1)]
    return out


def train_bags(lake) -> Counter:
    csr = load_dataset(lake, "syn").train
    return Counter(tuple(sorted(csr.indices[csr.indptr[r]:csr.indptr[r + 1]])) for r in range(csr.n_rows))


def two_workers(make_iter):
    """Run make_iter(rank) for ranks 0 and 1 concurrently (equal splits block until both consume)."""
    got, errors = {}, []

    def run(rank):
        try:
            got[rank] = list(make_iter(rank))
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return got


@pytest.mark.parametrize("world", [1, 2, 3])
def test_memory_shares_see_every_user_once_per_epoch_at_any_world_size(lake_with_shards, world):
    """What an elastic run relies on when its world size changes: the global batch stays B (each of W ranks
    takes B // W users a step), every rank runs the same number of steps, and an epoch sees each user at most
    once, leaving out fewer than W of them."""
    want = train_bags(lake_with_shards)
    n = sum(want.values())
    for epoch in (1, 2):
        seen = Counter()
        steps = []
        for rank in range(world):
            share = load_train_share(lake_with_shards, "syn", rank, world)
            batches = list(memory_batches(share, n, 100, seed=7, rank=rank, world=world)(epoch))
            steps.append(len(batches))
            assert max(len(off) - 1 for _, off in batches) == 100 // world
            seen += Counter(bags_of(batches))
        assert len(set(steps)) == 1  # DDP needs the same number of steps on every rank
        assert steps[0] == -(-(n // world) // (100 // world))  # ceil(users per rank / users per rank-step)
        assert not (seen - want) and sum((want - seen).values()) <= world - 1


def test_memory_order_is_reproducible_and_changes_with_seed_and_epoch(lake_with_shards):
    share = load_train_share(lake_with_shards, "syn", 0, 2)

    def order(seed, epoch):
        return bags_of(memory_batches(share, 480, 100, seed=seed, rank=0, world=2)(epoch))
    assert order(7, 1) == order(7, 1)
    assert order(7, 1) != order(8, 1) and order(7, 1) != order(7, 2)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("mode", ["stream", "cache"])
def test_ray_data_gives_every_user_once_per_epoch_across_two_workers(lake_with_shards, local_ray, mode):
    from macrid.data.ray_data import CachedShard, stream_batches, train_dataset

    want = train_bags(lake_with_shards)
    splits = train_dataset(lake_with_shards, "syn").streaming_split(2, equal=True)
    cached = [CachedShard(splits[r], 50, seed=3, rank=r) for r in (0, 1)]
    for epoch in (1, 2, 3):
        if mode == "stream":
            got = two_workers(lambda r: stream_batches(splits[r], 50, seed=3, epoch=epoch, rank=r, buffer_users=64))
        else:
            got = two_workers(lambda r: cached[r](epoch))
        assert len(got[0]) == len(got[1])  # the same number of steps on both workers
        seen = Counter(bags_of(got[0])) + Counter(bags_of(got[1]))
        assert not (seen - want), "a user seen twice or a bag that is not in the training set"
        assert sum((want - seen).values()) <= 1, "more than W - 1 users dropped by the equal split"


def test_stream_order_is_reproducible_for_a_seed_on_two_workers(lake_with_shards, local_ray):
    from macrid.data.ray_data import stream_batches, train_dataset

    def order(seed):
        splits = train_dataset(lake_with_shards, "syn").streaming_split(2, equal=True)
        got = two_workers(lambda r: stream_batches(splits[r], 50, seed=seed, epoch=1, rank=r, buffer_users=64))
        return bags_of(got[0]), bags_of(got[1])
    first = order(11)
    assert first == order(11)
    assert first != order(12)


@contextlib.contextmanager
def broken(lake, part: str, how: str):
    """Break one training shard of the current version in place, and restore it afterwards.

    how: "rot" (same size, 64 bytes of the data pages changed) or "torn" (only the first part of the
    file, as an interrupted upload leaves it). Yields the shard's path."""
    shard = f"{snapshot_uri(lake, 'syn')}/train/{part}"
    with open(shard, "rb") as f:
        original = f.read()
    try:
        with open(shard, "wb") as f:
            if how == "rot":
                third = len(original) // 3
                f.write(original[:third] + b"\xff" * 64 + original[third + 64:])
            else:
                f.write(original[:len(original) // 3])
        yield shard
    finally:
        with open(shard, "wb") as f:
            f.write(original)


@pytest.mark.parametrize("how", ["rot", "torn"])
def test_bad_shard_is_named_and_the_share_loads_after_the_fix(lake_with_shards, how):
    with broken(lake_with_shards, "part-00001.parquet", how):
        with pytest.raises(DataError, match="part-00001.parquet: cannot read this training shard.*--resume"):
            load_train_share(lake_with_shards, "syn", 0, 2)
    assert load_train_share(lake_with_shards, "syn", 0, 2).n_rows == 240


def test_torn_shard_is_named_before_ray_data_reads(lake_with_shards, local_ray):
    from macrid.data.ray_data import train_dataset

    with broken(lake_with_shards, "part-00002.parquet", "torn"):
        with pytest.raises(DataError, match="part-00002.parquet: cannot read this training shard"):
            train_dataset(lake_with_shards, "syn")
    assert train_dataset(lake_with_shards, "syn").count() == 480


def test_shard_torn_during_a_streamed_run_is_named(lake_with_shards, local_ray):
    """The footers pass the check at the run's start; the file is torn before the epoch reads it."""
    from macrid.data.ray_data import stream_batches, train_dataset

    train_uri = f"{snapshot_uri(lake_with_shards, 'syn')}/train"
    split = train_dataset(lake_with_shards, "syn").streaming_split(1, equal=True)[0]
    with broken(lake_with_shards, "part-00001.parquet", "torn"):
        with pytest.raises(DataError, match="part-00001.parquet: cannot read this training shard.*--resume"):
            list(stream_batches(split, 50, seed=1, epoch=1, rank=0, train_uri=train_uri))
    assert sum(len(o) - 1 for _, o in stream_batches(split, 50, seed=1, epoch=2, rank=0, train_uri=train_uri)) == 480


def test_a_run_stopped_by_a_bad_shard_names_it_and_resumes_after_the_fix(lake_with_shards, local_ray):
    """Under Ray Train the worker's error reaches the driver as that error (not one traceback per worker)."""
    from macrid.config import load_config
    from macrid.training.launch import launch

    def cfg(*extra):
        return load_config(None, [f"data.lake={lake_with_shards!r}", "data.dataset='syn'", "run.name='bad-shard'",
                                  "optim.epochs=2", "model.K=4", "model.D=8", "run.progress=false",
                                  "run.data='memory'", "run.max_failures=0", "run.cpus_per_worker=1", *extra])
    with broken(lake_with_shards, "part-00000.parquet", "rot"):
        with pytest.raises(DataError, match="part-00000.parquet: cannot read this training shard"):
            launch(cfg())
    resumed = launch(cfg("run.resume=true"))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]


def test_auto_caches_while_the_share_fits_the_memory_budget_and_streams_past_it():
    from macrid.config import load_config
    from macrid.training.launch import input_mode

    def mode(interactions, workers, budget):
        cfg = load_config(None, [f"run.num_workers={workers}", f"run.memory_budget_gb={budget}"])
        return input_mode(cfg, {"train": {"interactions": interactions}})

    # 11 bytes per cached interaction, measured on the planted lake (benchmarks/throughput.md)
    assert mode(10**8, 1, 1.2) == "memory"  # 1.10 GB share
    assert mode(10**8, 1, 1.0) == "stream"
    assert mode(10**8, 2, 0.6) == "memory"  # 0.55 GB per worker
    assert mode(10**8, 2, 0.5) == "stream"
