"""The MultVAE protocol (Liang et al. 2018), which MacridVAE follows exactly, as the pieces that
`prepare` runs: per user partition (`group_users`), on the driver (`order_users`, `vocabulary`,
`foldin_split`) and per output shard (`to_item_idx`).

Binarize (rating >= min_rating), keep each (user, item) once, keep users with >= min_user_items
items, shuffle the sorted users with a seeded numpy RandomState, hold out the last 2 * n_heldout
users as validation and test, build the item vocabulary from the training users only (in order of
first appearance in the input), and split each held-out user's items 80/20 into fold-in and targets
with a fresh RandomState per split, in user-ID order. The random calls mirror the reference
notebook, so the same seed gives the same users and the same targets.

"Input order" is the order of `pos` (raw_input.py), so every piece gives the same answer however the
rows were partitioned: a user's items are in the order of their first occurrence, and the
vocabulary in the order of each item's first occurrence among training users.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from macrid.errors import DataError


@dataclass(frozen=True)
class Protocol:
    seed: int = 98765
    min_rating: float | None = 4.0  # None keeps every interaction (implicit data)
    min_user_items: int = 5
    heldout: float = 0.1  # < 1: fraction of users per held-out split; >= 1: a count
    test_prop: float = 0.2  # share of a held-out user's items that become targets
    # "train": items of the training users (MultVAE); "catalogue": those first, then every other item of
    # the item table (cold items get rows, as a production catalogue needs; M is the catalogue's size)
    vocabulary: str = "train"

    def __post_init__(self) -> None:
        if self.vocabulary not in ("train", "catalogue"):
            raise DataError(f"vocabulary={self.vocabulary!r} must be 'train' or 'catalogue'")
        if not (self.heldout > 0 and np.isfinite(self.heldout)):
            raise DataError(f"--heldout {self.heldout} must be a positive fraction (< 1) or a count (>= 1)")
        if self.min_user_items < 1:
            raise DataError(f"--min-user-items {self.min_user_items} must be at least 1")
        if self.min_rating is not None and not np.isfinite(self.min_rating):
            raise DataError(f"--min-rating {self.min_rating} must be a finite number")

    def n_heldout(self, n_users: int) -> int:
        return int(self.heldout * n_users) if self.heldout < 1 else int(self.heldout)


def group_users(rows: pl.DataFrame, min_user_items: int) -> pl.DataFrame:
    """One partition's rows (user_id, item_id, pos), all rows of each of its users, in any order ->
    one row per kept user: user_id, items (list, input order), pos (list, each item's first pos).

    Vectorised (a sort and one group_by), never a Python function per user."""
    grouped = (rows.sort("pos").group_by("user_id", maintain_order=True)
               .agg(pl.col("item_id").alias("items"), pl.col("pos")))
    repeats = grouped["items"].list.n_unique() < grouped["items"].list.len()
    if repeats.any():  # keep each (user, item) once, at its first position: only the users who repeat one
        again = grouped.filter(repeats).explode("items", "pos").unique(["user_id", "items"], keep="first",
                                                                        maintain_order=True)
        again = again.group_by("user_id", maintain_order=True).agg("items", "pos")
        grouped = pl.concat([grouped.filter(~repeats), again])
    return grouped.filter(pl.col("items").list.len() >= min_user_items).sort("user_id")


MIN_SHARE_USERS = 2  # a held-out share must give at least this many users per split (one has no standard error)


def order_users(users: pl.Series, protocol: Protocol, source: str) -> tuple[pl.Series, int, int]:
    """Every kept user's ID (any order) -> (IDs in user_idx order, n_train, n_heldout)."""
    n_users = users.len()
    if n_users == 0:
        raise DataError(
            f"{source}: no interactions left after keeping ratings >= {protocol.min_rating} "
            f"and users with >= {protocol.min_user_items} items; check --min-rating and the rating column"
        )
    n_out = protocol.n_heldout(n_users)
    if protocol.heldout < 1 and 1 <= n_out < MIN_SHARE_USERS:  # a count below it is asked for; a share is not
        raise DataError(
            f"{source}: --heldout {protocol.heldout:g} of {n_users} users gives only {n_out} validation and {n_out} "
            f"test user(s), too few to measure anything (one user has no standard error); pass a larger share or a "
            f"count, e.g. --heldout {max(10, min(100, n_users // 10))}")
    if n_out < 1 or n_users - 2 * n_out < 1:
        raise DataError(
            f"{source}: {n_users} users after filtering cannot give {n_out} validation and {n_out} test "
            "users plus training users; lower --heldout or add data"
        )
    ordered = users.sort()  # pandas groupby order in the reference
    perm = np.random.RandomState(protocol.seed).permutation(n_users)
    return ordered.gather(perm), n_users - 2 * n_out, n_out


def item_firsts(train_rows: pl.DataFrame) -> pl.DataFrame:
    """Training users' rows (items, pos lists) -> per item: first_pos (its first occurrence), train_count."""
    return (train_rows.select("items", "pos").explode("items", "pos")
            .group_by("items").agg(first_pos=pl.col("pos").min(), train_count=pl.len().cast(pl.Int64))
            .rename({"items": "item_id"}))


def merge_item_firsts(parts: pl.DataFrame) -> pl.DataFrame:
    """Partial item_firsts of several partitions -> the total per item."""
    return parts.group_by("item_id").agg(pl.col("first_pos").min(), pl.col("train_count").sum())


def vocabulary(firsts: pl.DataFrame, protocol: Protocol, source: str,
               catalogue: pl.Series | None = None) -> pl.DataFrame:
    """Every training item's first_pos and train_count -> item_id, item_idx:int32, train_count:int64.

    Items in order of first appearance (pd.unique over the training users' rows); with
    vocabulary="catalogue", then every other item of the catalogue, in its order, with count 0."""
    vocab = firsts.sort("first_pos").select("item_id", "train_count")
    if protocol.vocabulary == "catalogue":
        if catalogue is None:
            raise DataError(f"{source}: vocabulary='catalogue' needs an item table; pass --items")
        cold = catalogue.cast(vocab["item_id"].dtype, strict=False)
        if cold.null_count() > catalogue.null_count():
            raise DataError(f"{source}: item table column item_id holds ids that are not of the interactions' "
                            f"type {vocab['item_id'].dtype}; make both the same type")
        cold = cold.drop_nulls().unique(maintain_order=True)
        cold = cold.filter(~cold.is_in(vocab["item_id"].implode()))
        vocab = pl.concat([vocab, pl.DataFrame({"item_id": cold, "train_count": pl.zeros(cold.len(), pl.Int64,
                                                                                         eager=True)})])
    return vocab.with_columns(item_idx=pl.int_range(vocab.height, dtype=pl.Int32)).select(
        "item_id", "item_idx", "train_count")


def to_item_idx(rows: pl.DataFrame, vocab: pl.DataFrame, key: str = "user_idx") -> pl.DataFrame:
    """Rows (key, items: list of item IDs) -> (key, items: list<int32> of item_idx), each list in its
    order; items outside the vocabulary are dropped, and so are rows left with none."""
    return (rows.select(key, "items").explode("items").rename({"items": "item_id"})
            .join(vocab.select("item_id", "item_idx"), on="item_id", how="inner", maintain_order="left")
            .group_by(key, maintain_order=True).agg(pl.col("item_idx").alias("items")))


def foldin_split(heldout: pl.DataFrame, vocab: pl.DataFrame, protocol: Protocol,
                 rng: np.random.RandomState | None = None) -> pl.DataFrame:
    """Held-out users (user_id, user_idx, items: list of item IDs in input order) -> (user_idx, foldin,
    heldout: list<int32>): 20% of each user's items as targets, drawn in user-ID order by a fresh
    RandomState(seed), as the reference notebook re-seeds for each split. Users with no item left in
    the vocabulary are dropped; those with fewer than 5 keep all as fold-in.

    rng: the split's generator where an earlier call left it, to split a sorted run of users in chunks of
    consecutive user IDs (prepare streams a split this way) with the draws of one call over all of them."""
    mapped = to_item_idx(heldout.select("user_id", "items"), vocab, key="user_id").sort("user_id")
    index = heldout.select("user_id", "user_idx")
    mapped = mapped.join(index, on="user_id", how="left", maintain_order="left")
    rng = np.random.RandomState(protocol.seed) if rng is None else rng
    lists = pa.chunked_array([mapped["items"].to_arrow()], pa.large_list(pa.int32())).combine_chunks() \
        if mapped.height else pa.array([], pa.large_list(pa.int32()))
    offsets = lists.offsets.to_numpy().astype(np.int64) - lists.offsets[0].as_py()  # (U+1,)
    items = lists.values.to_numpy(zero_copy_only=False).astype(np.int32)  # (N,) every user's items, in order
    target = np.zeros(len(items), dtype=bool)  # (N,) held out
    for u in range(len(offsets) - 1):
        n = int(offsets[u + 1] - offsets[u])
        if n >= 5:  # the same draws, in the same order, as one rng.choice per user
            target[offsets[u] + rng.choice(n, size=int(protocol.test_prop * n), replace=False)] = True
    owner = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))  # (N,) the row of each item
    return pl.DataFrame({
        "user_idx": mapped["user_idx"],
        "foldin": _lists(items[~target], np.bincount(owner[~target], minlength=len(offsets) - 1)),
        "heldout": _lists(items[target], np.bincount(owner[target], minlength=len(offsets) - 1)),
    }, schema={"user_idx": pl.Int64, "foldin": pl.List(pl.Int32), "heldout": pl.List(pl.Int32)}).sort("user_idx")


def _lists(values: np.ndarray, lengths: np.ndarray) -> pl.Series:
    """Flat int32 values and per-row lengths -> a list<int32> column, without a Python list per row."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pl.Series(pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32())))
