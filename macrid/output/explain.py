"""Explanations of a finished run for people: traversals (Sec. 2.4) and steering, with item titles.

Two sources give the same view (item vectors h, prototypes m, concepts c, tau, titles, a user's
components and items):
- `Run`: the run's published model (model.pt) and the dataset version it was trained on; a user's
  components are encoded from their items (Eq. 7);
- `ExportedRun`: the nightly export's Delta tables (docs/export-schema.md) for one date, with no
  checkpoint: h, c and titles from `item_concepts`, m from `prototypes`, a user's components from
  `user_components`, tau from the commit metadata; a user's items (steering never recommends them) from
  the dataset the export read.
The maths is in macrid/output/traverse.py; this module maps IDs and titles.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from macrid.data import lake, layout
from macrid.data.batches import snapshot_uri
from macrid.errors import CheckpointError, ConfigError, DataError
from macrid.model.vae import item_concept
from macrid.output import delta
from macrid.output.export import export_uri
from macrid.output.published import published_run
from macrid.output.traverse import SteerItems, steer, traverse


class Run:
    def __init__(self, lake_root: str, run: str):
        self.lake, self.run = lake_root, run
        self.model, self.saved, self.vocab, self.record = published_run(lake_root, run)
        self.h = self.model.h.detach().numpy()  # (M, D)
        self.m = self.model.m.detach().numpy()  # (K, D)
        self.K, self.D, self.tau = self.model.K, self.model.D, self.model.tau
        self.bias = None if self.model.item_bias is None else self.model.item_bias.detach()  # (M,) b_i
        with torch.no_grad():
            self.c = self.model.eval().concepts()  # (M, K) Eq. 6, the softmax

    def item_index(self, item_id: str) -> int:
        ids = self.vocab["item_id"]
        key = pl.Series([item_id]).cast(ids.dtype, strict=False)[0]
        if key is None:  # e.g. "1.5" or "abc" against integer IDs
            raise DataError(f"item {item_id!r} is not an item ID of run {self.run!r}: its IDs are {ids.dtype} "
                            f"(e.g. {ids[0]!r})")
        found = self.vocab.filter(ids == key)
        if found.height == 0:
            raise DataError(f"item {item_id!r} is not in run {self.run!r}'s vocabulary ({len(self.vocab):,} items, "
                            f"e.g. {ids[0]!r}); pass an item ID of the dataset it was trained on")
        return int(found["item_idx"][0])

    def title(self, idx: int) -> str:
        row = self.vocab.row(idx, named=True)
        return f"{row['title'] or '(no title)'} [{row['item_id']}]"

    def user_items(self, user_id: str) -> torch.Tensor:
        """The user's items (item indices) in the run's dataset version: train items, or fold-in + held-out."""
        return dataset_user_items(self.lake, self.record["dataset"], self.record["version"], user_id,
                                  f"run {self.run!r}")

    def components(self, items: torch.Tensor) -> torch.Tensor:
        """The user's mu (K, D) from their items."""
        return self.model.represent(items, torch.tensor([0, len(items)]))[0]

    def user_components(self, user_id: str, items: torch.Tensor | None = None) -> torch.Tensor:
        """The user's mu (K, D), encoded from their items (pass them when already read)."""
        return self.components(self.user_items(user_id) if items is None else items)

    def check_dim(self, j: int) -> None:
        if not 0 <= j < self.D:
            raise ConfigError(f"--dim {j} is out of range: run {self.run!r} has D = {self.D} dimensions "
                              f"(0..{self.D - 1})")

    def check_component(self, k: int) -> None:
        if not 0 <= k < self.K:
            raise ConfigError(f"component {k} is out of range: run {self.run!r} has K = {self.K} "
                              f"(0..{self.K - 1})")


class ExportedRun(Run):
    """The same view from an export's tables (<lake>/exports/<name>/, one date), without the checkpoint."""

    def __init__(self, lake_root: str, name: str, date: str | None = None):
        self.lake, self.run = lake_root, f"export {name}"
        items_uri = export_uri(lake_root, name, "item_concepts")
        table = delta.open_table(items_uri)
        if table is None:
            raise CheckpointError(f"{items_uri}: no export table; run jobs/export.py --lake {lake_root} --name {name} "
                                  f"first (ls {layout.exports_uri(lake_root)})")
        meta = delta.last_commit(items_uri)
        if "model" not in meta:
            raise CheckpointError(f"{items_uri}: the latest commit has no model metadata (tau); it predates "
                                  "explaining from exports: re-run jobs/export.py for that date")
        self.date = date or meta["date"]
        self.tau, self.K, self.D = float(meta["model"]["tau"]), int(meta["model"]["K"]), int(meta["model"]["D"])
        self.record, self._users_uri = meta, export_uri(lake_root, name, "user_components")
        items = _partition(table, self.date, items_uri).sort("item_id")
        self.vocab = items.select(pl.int_range(items.height).alias("item_idx"), "item_id", "title")
        self.h = np.stack(items["h"].to_numpy()).astype(np.float32)  # (M, D)
        self.c = torch.as_tensor(np.stack(items["probabilities"].to_numpy()).astype(np.float32))  # (M, K)
        # (M,) b_i; exports written before the column existed come from models without an item bias
        self.bias = torch.tensor(items["bias"].to_numpy()) if "bias" in items.columns else None
        protos = _partition(delta.open_table(export_uri(lake_root, name, "prototypes")), self.date,
                            export_uri(lake_root, name, "prototypes")).sort("concept")
        self.m = np.stack(protos["m"].to_numpy()).astype(np.float32)  # (K, D)

    def user_components(self, user_id: str, items: torch.Tensor | None = None) -> torch.Tensor:
        """mu (K, D) as exported for the user on this date (items are not needed)."""

        data = delta.open_table(self._users_uri).to_pyarrow_dataset()
        key = pl.Series([user_id]).cast(pl.from_arrow(data.schema.empty_table())["user_id"].dtype, strict=False)[0]
        rows = pl.DataFrame()
        if key is not None:
            rows = pl.from_arrow(data.to_table(filter=(pads.field("dt") == self.date) & (pads.field("user_id") == key),
                                               columns=["component", "mu"])).sort("component")
        if rows.height == 0:
            raise DataError(f"user {user_id!r} has no components in {self._users_uri} for dt={self.date} "
                            "(not in the export's input, or no known item); pass a user ID the export wrote")
        return torch.as_tensor(np.stack(rows["mu"].to_numpy()).astype(np.float32))

    def user_items(self, user_id: str) -> torch.Tensor:
        """The user's items, from the dataset the export read (raw-input exports cannot say)."""
        source = self.record.get("input", {})
        if "dataset" not in source:
            raise ConfigError(f"the export read raw interactions ({source.get('uri')}), so it cannot say which items "
                              f"user {user_id!r} already has; steer with --run, or export from a dataset")
        item_ids = dataset_user_items(self.lake, source["dataset"], source["version"], user_id, self.run, ids=True)
        return torch.as_tensor(np.sort(self.vocab.filter(pl.col("item_id").is_in(item_ids))["item_idx"].to_numpy()))


def _partition(table, date: str, uri: str) -> pl.DataFrame:
    rows = pl.from_arrow(table.to_pyarrow_dataset().to_table(filter=pads.field("dt") == date))
    if rows.height == 0:
        dates = sorted(set(pl.from_arrow(table.to_pyarrow_dataset().to_table(columns=["dt"]))["dt"].to_list()))
        raise DataError(f"{uri}: no partition dt={date}; it has {dates[-5:]} (pass --date)")
    return rows


def dataset_user_items(lake_root: str, dataset: str, version: str, user_id: str, what: str,
                       ids: bool = False) -> torch.Tensor | list:
    """A user's items in a dataset version: train items, or fold-in + held-out. Item indices, or IDs."""
    snap = snapshot_uri(lake_root, dataset, version)

    fs, _ = lake.resolve(snap)
    files = lake.list_parquet(lake.join(snap, "users"))
    if not files:
        raise DataError(f"{lake.join(snap, 'users')}: no users table, so {what}'s user IDs cannot be looked up (the "
                        f"dataset version is gone or the lake cannot be read); check the lake, or re-prepare {dataset!r}")
    schema = pq.read_schema(files[0], filesystem=fs)  # the ID's type
    key = pl.Series([user_id]).cast(pl.from_arrow(schema.empty_table())["user_id"].dtype, strict=False)[0]
    found = pl.DataFrame()
    if key is not None:  # only the row groups that can hold the user are read
        found = pl.from_arrow(lake.read_table(lake.join(snap, "users"), filters=pads.field("user_id") == key))
    if found.height == 0:
        raise DataError(f"user {user_id!r} is not in dataset {dataset!r} of {what} "
                        f"(its user IDs are {schema.field('user_id').type}); pass a user ID of that dataset")
    idx, split = int(found["user_idx"][0]), found["split"][0]
    table = pl.from_arrow(lake.read_table(lake.join(snap, split), filters=pads.field("user_idx") == idx))
    items = table["items"][0] if split == "train" else table["foldin"][0].extend(table["heldout"][0])
    positions = np.sort(items.to_numpy()).astype(np.int64)
    if ids:
        vocab = pl.from_arrow(lake.read_table(lake.join(snap, "items"), ["item_idx", "item_id"])).sort("item_idx")
        return vocab["item_id"].gather(positions).to_list()
    return torch.as_tensor(positions)


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
        start = run.user_components(user)[component].numpy()
        origin = f"component {component} of user {user}"
    t = traverse(start, dim, run.h, run.m, run.tau, steps, gamma, width, exclude)
    return {"from": origin, "concept": t.concept, "dimension": dim, "range": t.range,
            "steps": [{"value": v, "item": run.title(i), "id": str(run.vocab["item_id"][i]),
                       "concept": int(item_concept(run.c[i:i + 1])[0])} for i, v in zip(t.items, t.values)]}


def steering(run: Run, user: str, edits: list[tuple[int, int, float]], weights: dict[int, float],
             top_n: int = 10) -> dict:
    """A user's top-N before and after: edits (component k, dimension j, value), concept weights {k: w}."""
    items = run.user_items(user)
    mu = run.user_components(user, items)  # (K, D)
    table = SteerItems.of(torch.as_tensor(run.h), run.c, run.bias)
    before = steer(table, run.tau, mu, items, top_n)
    edited = mu.clone()
    for k, j, value in edits:
        run.check_component(k)
        run.check_dim(j)
        edited[k, j] = value
    w = torch.ones(run.K)
    for k, value in weights.items():
        run.check_component(k)
        w[k] = value
    after = steer(table, run.tau, edited, items, top_n, w)

    def listing(result):
        top, scores, concepts = result
        return [{"item": run.title(int(i)), "score": float(s), "concept": int(c)}
                for i, s, c in zip(top, scores, concepts)]
    return {"user": user, "before": listing(before), "after": listing(after)}
