"""The MultVAE protocol as macrid implemented it in memory before prepare moved to Ray Data (frozen copy).

The identity tests compare the distributed prepare against this: written independently of the code under
test, it is the expectation. Do not import it from macrid/ and do not change it."""

from __future__ import annotations

import numpy as np
import polars as pl

class DataError(Exception):
    pass


def split_multvae(interactions: pl.DataFrame, protocol, source: str = "input",
                  catalogue: pl.Series | None = None):
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
    return dict(item_ids=item_ids, user_ids=users, n_train_users=n_train, n_heldout=n_out, train=train, val=val,
                test=test, n_interactions=n_filtered)


def _foldin_split(df: pl.DataFrame, lo: int, hi: int, users, protocol) -> pl.DataFrame:
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
def _items_table(split, items: pl.DataFrame | None) -> pl.DataFrame:
    """The vocabulary with metadata and each item's training count (the sampler's popularity: streamed
    workers read it here instead of loading every training bag)."""
    n = split['item_ids'].len()
    counts = np.bincount(split['train']["items"].explode().drop_nulls().to_numpy(), minlength=n)
    vocab = pl.DataFrame({"item_idx": pl.int_range(n, dtype=pl.Int32, eager=True), "item_id": split['item_ids']})
    if items is None:
        table = vocab.with_columns(pl.lit(None, pl.String).alias("title"),
                                   pl.lit(None, pl.List(pl.String)).alias("genres"))
    else:
        items = items.with_columns(pl.col("item_id").cast(vocab["item_id"].dtype, strict=False)).unique("item_id")
        table = vocab.join(items, on="item_id", how="left", maintain_order="left")
    return table.with_columns(train_count=pl.Series(counts.astype(np.int64)))


def _users_table(split) -> pl.DataFrame:
    n, h = split['user_ids'].len(), split['n_heldout']
    labels = ["train"] * split['n_train_users'] + ["val"] * h + ["test"] * h
    return pl.DataFrame({"user_idx": pl.int_range(n, dtype=pl.Int64, eager=True), "user_id": split['user_ids'],
                         "split": labels})


def union(parts, names: list[str]):
    """Several sources as one: user and item ids become "<name>:<id>", so the sources never collide."""
    if len(set(names)) != len(names):
        raise DataError(f"the --input sources need distinct folder names to tell their ids apart; got {names}")
    frames, item_frames = [], []
    for raw, name in zip(parts, names, strict=True):
        def prefixed(col: str) -> pl.Expr:
            return (pl.lit(f"{name}:") + pl.col(col).cast(pl.String)).alias(col)

        interactions, its_items = raw
        frames.append(interactions.with_columns(prefixed("user_id"), prefixed("item_id")))
        if its_items is not None:
            item_frames.append(its_items.with_columns(prefixed("item_id")))
    items = pl.concat(item_frames) if len(item_frames) == len(parts) else None
    return pl.concat(frames), items




def tables(interactions: pl.DataFrame, items: pl.DataFrame | None, protocol, catalogue=None) -> dict:
    """The tables the in-memory prepare wrote: items, users, train, val, test (as polars frames)."""
    split = split_multvae(interactions, protocol, catalogue=catalogue)
    return {"items": _items_table(split, items), "users": _users_table(split), "train": split["train"],
            "val": split["val"], "test": split["test"], "n_interactions": split["n_interactions"]}
