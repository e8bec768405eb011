"""The MultVAE protocol (Liang et al. 2018), which MacridVAE follows exactly.

Binarize (rating >= min_rating), keep users with >= min_user_items items,
shuffle the users with a seeded numpy RandomState, hold out the last
2 * n_heldout users as validation and test, build the item vocabulary from the
training users only, and split each held-out user's items 80/20 into fold-in
and targets. The random calls mirror the reference notebook, so the same seed
gives the same users and the same targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

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

    def n_heldout(self, n_users: int) -> int:
        return int(self.heldout * n_users) if self.heldout < 1 else int(self.heldout)


@dataclass(frozen=True)
class Split:
    """A split in the lake's vocabulary: user_idx follows the shuffled order, item_idx the vocabulary."""

    item_ids: pl.Series  # (M,) original item IDs, position = item_idx
    user_ids: pl.Series  # (U,) original user IDs, position = user_idx
    n_train_users: int
    n_heldout: int
    train: pl.DataFrame  # user_idx, items: list[int32]
    val: pl.DataFrame  # user_idx, foldin, heldout: list[int32]
    test: pl.DataFrame
    n_interactions: int  # after binarizing and filtering, before the vocabulary restriction


def split_multvae(interactions: pl.DataFrame, protocol: Protocol, source: str = "input",
                  catalogue: pl.Series | None = None) -> Split:
    """catalogue: every item id of the item table, for protocol.vocabulary == "catalogue"."""
    df = interactions
    if protocol.min_rating is not None and df["rating"].null_count() < df.height:
        df = df.filter(pl.col("rating") >= protocol.min_rating)
    df = df.select("user_id", "item_id").unique(maintain_order=True)
    counts = df.group_by("user_id").len()
    keep = counts.filter(pl.col("len") >= protocol.min_user_items)["user_id"]
    df = df.filter(pl.col("user_id").is_in(keep.implode()))
    if df.height == 0:
        raise DataError(
            f"{source}: no interactions left after keeping ratings >= {protocol.min_rating} "
            f"and users with >= {protocol.min_user_items} items; check --min-rating and the rating column"
        )

    users = df["user_id"].unique().sort()  # pandas groupby order in the reference
    n_users = users.len()
    n_out = protocol.n_heldout(n_users)
    if n_out < 1 or n_users - 2 * n_out < 1:
        raise DataError(
            f"{source}: {n_users} users after filtering cannot give {n_out} validation and {n_out} test "
            "users plus training users; lower --heldout or add data"
        )
    perm = np.random.RandomState(protocol.seed).permutation(n_users)
    users = users.gather(perm)
    user_idx = pl.DataFrame({"user_id": users, "user_idx": np.arange(n_users, dtype=np.int64)})
    df = df.join(user_idx, on="user_id", how="left", maintain_order="left")
    n_train = n_users - 2 * n_out

    n_filtered = df.height
    train_plays = df.filter(pl.col("user_idx") < n_train)
    item_ids = train_plays["item_id"].unique(maintain_order=True)  # pd.unique order
    if protocol.vocabulary == "catalogue":
        if catalogue is None:
            raise DataError(f"{source}: vocabulary='catalogue' needs an item table; pass --items")
        cold = catalogue.cast(item_ids.dtype, strict=False)
        if cold.null_count() > catalogue.null_count():
            raise DataError(f"{source}: item table column item_id holds ids that are not of the interactions' "
                            f"type {item_ids.dtype}; make both the same type")
        cold = cold.drop_nulls().unique(maintain_order=True)
        item_ids = pl.concat([item_ids, cold.filter(~cold.is_in(item_ids.implode()))])
    vocab = pl.DataFrame({"item_id": item_ids, "item_idx": np.arange(item_ids.len(), dtype=np.int32)})
    df = df.join(vocab, on="item_id", how="inner", maintain_order="left")

    train = (
        df.filter(pl.col("user_idx") < n_train)
        .group_by("user_idx", maintain_order=True).agg(pl.col("item_idx").alias("items"))
        .sort("user_idx")
    )
    val = _foldin_split(df, n_train, n_train + n_out, users, protocol)
    test = _foldin_split(df, n_train + n_out, n_users, users, protocol)
    return Split(item_ids, users, n_train, n_out, train, val, test, n_interactions=n_filtered)


def _foldin_split(df: pl.DataFrame, lo: int, hi: int, users: pl.Series, protocol: Protocol) -> pl.DataFrame:
    """80/20 fold-in/target split per held-out user, in original-user-ID order with a fresh seed."""
    part = df.filter((pl.col("user_idx") >= lo) & (pl.col("user_idx") < hi))
    grouped = part.group_by("user_id", maintain_order=True).agg("user_idx", "item_idx").sort("user_id")
    rng = np.random.RandomState(protocol.seed)
    rows_idx, foldin, heldout = [], [], []
    for uidx, items in zip(grouped["user_idx"].to_list(), grouped["item_idx"].to_list()):
        items = np.asarray(items, dtype=np.int32)
        n = len(items)
        mask = np.zeros(n, dtype=bool)
        if n >= 5:
            mask[rng.choice(n, size=int(protocol.test_prop * n), replace=False)] = True
        rows_idx.append(uidx[0])
        foldin.append(items[~mask].tolist())
        heldout.append(items[mask].tolist())
    return pl.DataFrame(
        {"user_idx": rows_idx, "foldin": foldin, "heldout": heldout},
        schema={"user_idx": pl.Int64, "foldin": pl.List(pl.Int32), "heldout": pl.List(pl.Int32)},
    ).sort("user_idx")
