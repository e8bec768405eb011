"""Explanations of a finished run for people: traversals (Sec. 2.4) and steering, with item titles.

Reads the run's published model (model.pt) and the dataset version it was trained on (vocabulary,
titles, and a user's items). The maths is in macrid/output/traverse.py; this module maps IDs and titles.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from macrid.data import lake
from macrid.data.batches import snapshot_uri
from macrid.errors import ConfigError, DataError
from macrid.output.published import published_run
from macrid.output.traverse import steer, traverse


class Run:
    def __init__(self, lake_root: str, run: str):
        self.lake, self.run = lake_root, run
        self.model, self.saved, self.vocab, self.record = published_run(lake_root, run)
        self.h = self.model.h.detach().numpy()  # (M, D)
        self.m = self.model.m.detach().numpy()  # (K, D)

    def item_index(self, item_id: str) -> int:
        ids = self.vocab["item_id"]
        found = self.vocab.filter(ids == pl.Series([item_id]).cast(ids.dtype, strict=False)[0])
        if found.height == 0:
            raise DataError(f"item {item_id!r} is not in run {self.run!r}'s vocabulary ({len(self.vocab):,} items, "
                            f"e.g. {ids[0]!r}); pass an item ID of the dataset it was trained on")
        return int(found["item_idx"][0])

    def title(self, idx: int) -> str:
        row = self.vocab.row(idx, named=True)
        return f"{row['title'] or '(no title)'} [{row['item_id']}]"

    def user_items(self, user_id: str) -> torch.Tensor:
        """The user's items (item indices) in the run's dataset version: train items, or fold-in + held-out."""
        snap = snapshot_uri(self.lake, self.record["dataset"], self.record["version"])
        users = pl.from_arrow(lake.read_table(lake.join(snap, "users")))
        key = pl.Series([user_id]).cast(users["user_id"].dtype, strict=False)[0]
        found = users.filter(pl.col("user_id") == key)
        if key is None or found.height == 0:
            raise DataError(f"user {user_id!r} is not in dataset {self.record['dataset']!r} of run {self.run!r} "
                            f"({users.height:,} users, e.g. {users['user_id'][0]!r})")
        idx, split = int(found["user_idx"][0]), found["split"][0]
        table = pl.from_arrow(lake.read_table(lake.join(snap, split))).filter(pl.col("user_idx") == idx)
        items = table["items"][0] if split == "train" else table["foldin"][0].extend(table["heldout"][0])
        return torch.as_tensor(np.sort(items.to_numpy()).astype(np.int64))

    def components(self, items: torch.Tensor) -> torch.Tensor:
        """The user's mu (K, D) from their items."""
        return self.model.represent(items, torch.tensor([0, len(items)]))[0]

    def check_dim(self, j: int) -> None:
        if not 0 <= j < self.model.D:
            raise ConfigError(f"--dim {j} is out of range: run {self.run!r} has D = {self.model.D} dimensions "
                              f"(0..{self.model.D - 1})")

    def check_component(self, k: int) -> None:
        if not 0 <= k < self.model.K:
            raise ConfigError(f"component {k} is out of range: run {self.run!r} has K = {self.model.K} "
                              f"(0..{self.model.K - 1})")


def traversal(run: Run, dim: int, item: str | None = None, user: str | None = None, component: int = 0,
              steps: int = 8, gamma: float = 0.1, width: int = 16) -> dict:
    """Traverse dimension `dim` from an item's h_i or from a user's component; items with titles, in order."""
    run.check_dim(dim)
    if (item is None) == (user is None):
        raise ConfigError("start from exactly one of --item or --user")
    exclude = None
    if item is not None:
        exclude = run.item_index(item)
        start, origin = run.h[exclude], f"item {run.title(exclude)}"
    else:
        run.check_component(component)
        start = run.components(run.user_items(user))[component].numpy()
        origin = f"component {component} of user {user}"
    t = traverse(start, dim, run.h, run.m, run.model.tau, steps, gamma, width, exclude)
    return {"from": origin, "concept": t.concept, "dimension": dim, "range": t.range,
            "steps": [{"value": v, "item": run.title(i)} for i, v in zip(t.items, t.values)]}


def steering(run: Run, user: str, edits: list[tuple[int, int, float]], weights: dict[int, float],
             top_n: int = 10) -> dict:
    """A user's top-N before and after: edits (component k, dimension j, value), concept weights {k: w}."""
    items = run.user_items(user)
    mu = run.components(items)  # (K, D)
    before = steer(run.model, mu, items, top_n)
    edited = mu.clone()
    for k, j, value in edits:
        run.check_component(k)
        run.check_dim(j)
        edited[k, j] = value
    w = torch.ones(run.model.K)
    for k, value in weights.items():
        run.check_component(k)
        w[k] = value
    after = steer(run.model, edited, items, top_n, w)

    def listing(result):
        top, scores, concepts = result
        return [{"item": run.title(int(i)), "score": float(s), "concept": int(c)}
                for i, s, c in zip(top, scores, concepts)]
    return {"user": user, "before": listing(before), "after": listing(after)}
