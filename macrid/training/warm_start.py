"""Warm start across vocabularies: tonight's run starts from yesterday's model, its items matched by ID.

The parent is a finished run (or what a model alias points to, macrid/training/registry.py); the child
trains on its own dataset, whose item vocabulary may differ and numbers its items differently. The driver
builds the child's initial checkpoint once, `<run>/warm_start.pt`, and every worker starts from that file
(as a resumed run starts from its latest checkpoint), so every rank holds the same state without a broadcast.

The rule, for every item-indexed tensor (the model's item tables h, t and the item bias, their EMA
averages and their optimizer moments; `item_params` of the model class):

- a carried item (its ID in both vocabularies) keeps its row, bit for bit, whatever its new index;
- a new item j gets the item fold-in of its training bags: the mean of the carried rows of the items it
  co-occurs with, each co-occurrence counted once,
      row_j = Σ_{u ∋ j} Σ_{i ∈ u, i carried} row_i  /  Σ_{u ∋ j} |{i ∈ u : i carried}|,
  for the weights and for the EMA averages (each from its own parent rows); its optimizer moments start
  at zero (a fresh row, as Adam starts one); a new item no training user pairs with a carried item keeps
  the fresh initialisation (the run's seed);
- an item that is no longer in the vocabulary drops out.

Everything else (the prototypes m_k, f_nn, t_bias, deeper layers) carries over whole, so concept k keeps
its meaning; the run neither re-clusters its prototypes at model.proto_init_epoch nor refines them
(model.proto_refine) unless run.warm_start_recluster is set. It fine-tunes: its learning rate is optim.lr x
run.warm_start_lr_scale (0.25), and its β starts at its cap, since the parent's posterior is already trained.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import torch

from macrid.config import Config
from macrid.data import lake, layout
from macrid.data.batches import CSR, train_chunks
from macrid.errors import CheckpointError, ConfigError
from macrid.model.row_sparse import Optimizers, tables_of
from macrid.model.vae import build_model
from macrid.training import checkpoint
from macrid.training.run_folder import RAY_SNAPSHOT, RUN_FILE, holds_checkpoint, read_vocabulary, run_uri
from macrid.training.session import SCORE
# ray: imported inside the functions that use them. Importing them is a start-up cost (Ray about 1.2 s on the
# development VM) that the paths without them (--help, in-process runs, tests) need not pay.

log = logging.getLogger(__name__)
INITIAL_FILE = "warm_start.pt"  # the child's initial checkpoint, built by the driver, read by every rank


@dataclasses.dataclass(frozen=True)
class ItemMap:
    """Where each item of the child's vocabulary comes from in the parent's."""

    parent_row: np.ndarray  # (M_child,) int64: the parent's row of each child item, -1 for a new item
    n_parent: int

    @property
    def carried(self) -> np.ndarray:
        return self.parent_row >= 0  # (M_child,) bool

    def counts(self) -> dict:
        carried = int(self.carried.sum())
        return {"carried": carried, "added": int(len(self.parent_row) - carried), "dropped": self.n_parent - carried}


def match_items(parent_ids: pa.Array, child_ids: pa.Array) -> ItemMap:
    """Items matched by ID (as text, so 42 and "42" are one item), never by index. Arrays in item_idx order."""
    parent = pa.compute.cast(parent_ids, pa.string())
    child = pa.compute.cast(child_ids, pa.string())
    rows = pa.compute.index_in(child, value_set=parent).fill_null(-1)
    return ItemMap(rows.to_numpy(zero_copy_only=False).astype(np.int64), len(parent))


def fold_in_sums(bags: Iterable[CSR], carried: np.ndarray, tables: list[torch.Tensor]
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """For every item j: Σ over its bags u of the sum of u's carried rows, per table, and Σ_u |u ∩ carried|.

    bags: the child's training bags in child item indices, any number of chunks (memory: one chunk plus the
    sums). tables: (M_child, ...) tensors whose carried rows are filled in. Returns sums like the tables and
    counts (M_child,) float64."""
    carried_t = torch.from_numpy(carried)
    sums = [torch.zeros(t.shape, dtype=torch.float64) for t in tables]
    counts = torch.zeros(len(carried), dtype=torch.float64)
    for bag in bags:
        idx = torch.from_numpy(bag.indices)  # (N,)
        rows = torch.repeat_interleave(torch.arange(bag.n_rows), torch.from_numpy(np.diff(bag.indptr)),
                                       output_size=len(idx))  # (N,)
        is_carried = carried_t[idx]  # (N,)
        n_u = torch.zeros(bag.n_rows, dtype=torch.float64).index_add_(0, rows, is_carried.double())  # (B,)
        counts.index_add_(0, idx, n_u[rows])
        for table, acc in zip(tables, sums):
            own = table[idx].double() * is_carried.view(-1, *([1] * (table.dim() - 1)))  # (N, ...) carried only
            per_user = torch.zeros((bag.n_rows, *table.shape[1:]), dtype=torch.float64).index_add_(0, rows, own)
            acc.index_add_(0, idx, per_user[rows])  # (M_child, ...)
    return sums, counts


def carry_rows(parent: torch.Tensor, fresh: torch.Tensor, items: ItemMap) -> torch.Tensor:
    """The child's table: carried rows from `parent` (bit for bit), the others from `fresh` (M_child, ...)."""
    out = fresh.clone()
    keep = torch.from_numpy(items.carried)
    out[keep] = parent[torch.from_numpy(items.parent_row[items.carried])].to(out.dtype)
    return out


def fold_in_new_rows(table: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, items: ItemMap) -> torch.Tensor:
    """New items with a carried co-occurring item get their fold-in row (sum / count); the rest stay as they are."""
    new = torch.from_numpy(~items.carried) & (counts > 0)  # (M_child,)
    out = table.clone()
    shape = (-1, *([1] * (table.dim() - 1)))
    out[new] = (sums[new] / counts[new].view(shape)).to(table.dtype)
    return out


def parent_checkpoint(lake_root: str, parent: str) -> dict:
    """The parent run's best full checkpoint (weights, optimizer, EMA): in-process runs keep it as
    checkpoints/best.pt, Ray Train runs among Ray's checkpoints (ray.train.Result.from_path)."""
    run = layout.run_uri(lake_root, parent)
    local = lake.join(run, "checkpoints", "best.pt")
    if lake.exists(local):
        return checkpoint.load(local)

    if not lake.exists(lake.join(run, RAY_SNAPSHOT)):
        raise CheckpointError(f"{run}: no checkpoint to warm-start from (neither checkpoints/best.pt nor Ray "
                              f"Train's {RAY_SNAPSHOT}); pass a finished run of this lake, or train without --warm-start")
    import ray.train

    fs, path = lake.resolve(run)
    result = ray.train.Result.from_path(path, storage_filesystem=fs)
    best = result.get_best_checkpoint(SCORE, "max") or result.checkpoint
    if best is None:
        raise CheckpointError(f"{run}: Ray Train recorded no checkpoint; pass a finished run, or train without --warm-start")
    return checkpoint.from_ray(best)


def base_lr(cfg: Config) -> float:
    """The learning rate the run trains at: optim.lr, scaled by run.warm_start_lr_scale on a warm start."""
    return cfg.optim.lr * (cfg.run.warm_start_lr_scale if cfg.run.warm_start else 1.0)


def keeps_prototypes(cfg: Config) -> bool:
    """Whether the run leaves its prototypes where training takes them (no k-means re-centring or refinement):
    a warm start does, unless run.warm_start_recluster."""
    return bool(cfg.run.warm_start) and not cfg.run.warm_start_recluster


def build_initial(cfg: Config, parent_state: dict, items: ItemMap, bags: Iterable[CSR], fingerprint: str
                  ) -> dict:
    """The child's initial checkpoint (a dict in checkpoint.to_bytes's layout, step 0, epoch 0)."""
    n_items = len(items.parent_row)
    torch.manual_seed(cfg.run.seed)  # the fresh rows: the same initial weights a run from scratch would draw
    row_sparse = cfg.optim.negatives > 0 and cfg.optim.row_sparse
    model = build_model(cfg.model, n_items, row_sparse)
    opt = Optimizers(model, tables_of(model, row_sparse), cfg.optim.optimizer, base_lr(cfg), cfg.optim.weight_decay)
    item_keys = [k for k in model.item_params if getattr(model, k, None) is not None]
    fresh = model.state_dict()
    parent_model = parent_state["model"]
    _same_architecture(fresh, parent_model, item_keys, items.n_parent)

    weights = {k: (carry_rows(parent_model[k], v, items) if k in item_keys else parent_model[k].clone())
               for k, v in fresh.items()}
    ema = _parent_ema(cfg, parent_state)
    ema_tables = [carry_rows(ema[f"module.{k}"], fresh[k], items) for k in item_keys] if ema else []
    tables = [weights[k] for k in item_keys] + ema_tables
    sums, counts = fold_in_sums(bags, items.carried, tables)
    for k, s in zip(item_keys, sums):
        weights[k] = fold_in_new_rows(weights[k], s, counts, items)
    if ema:
        ema = dict(ema)
        for k, t, s in zip(item_keys, ema_tables, sums[len(item_keys):]):
            ema[f"module.{k}"] = fold_in_new_rows(t, s, counts, items)
        for k in fresh:  # buffers and the rest: the parent's average carries over whole
            if k not in item_keys:
                ema[f"module.{k}"] = ema[f"module.{k}"].clone()
    model.load_state_dict(weights)
    optimizer = _carry_optimizer(parent_state.get("optimizer"), opt, model, item_keys, items)
    folded = int(((~items.carried) & (counts.numpy() > 0)).sum())
    log.info("warm start: %s", items.counts() | {"added_folded_in": folded})
    return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "optimizer": optimizer,
            "step": 0, "epoch": 0, "config": cfg.to_dict(), "n_items": n_items, "vocabulary_fingerprint": fingerprint,
            "extra": {"best": -1.0, "best_epoch": 0, "bad_evals": 0, "history": [], "ema": ema or None,
                      "warm_start": items.counts() | {"added_folded_in": folded}}}


def _same_architecture(fresh: dict, parent: dict, item_keys: list[str], n_parent: int) -> None:
    """Every weight of the child exists in the parent with the same shape (item tables: but for M)."""
    for k, v in fresh.items():
        p = parent.get(k)
        expected = (n_parent, *v.shape[1:]) if k in item_keys else tuple(v.shape)
        if p is None or tuple(p.shape) != expected:
            found = "missing" if p is None else f"shape {tuple(p.shape)}"
            raise ConfigError(f"warm start: the parent's weight {k!r} is {found}, the child's config needs "
                              f"{expected}; warm-start with the parent's model section (model.name, K, D, "
                              "encoder_layers, item_bias), or train without --warm-start")
    extra = sorted(set(parent) - set(fresh))
    if extra:
        raise ConfigError(f"warm start: the parent has weights the child's config lacks ({extra[:5]}); use the "
                          "parent's model section, or train without --warm-start")


def _parent_ema(cfg: Config, parent_state: dict) -> dict | None:
    """The parent's EMA averages when both runs keep one; a child with an EMA and a parent without starts its
    average from the weights (as any run does)."""
    ema = parent_state.get("extra", {}).get("ema")
    return dict(ema) if ema is not None and cfg.optim.ema > 0 else None


def _carry_optimizer(parent: dict | None, opt: Optimizers, model: torch.nn.Module, item_keys: list[str],
                     items: ItemMap) -> dict:
    """The parent's optimizer state with its item-indexed moments remapped (new rows: zero moments).

    Refused when the two optimizers hold their parameters differently (optim.optimizer, negatives, row_sparse)."""
    child = opt.state_dict()
    if parent is None:
        return child
    parts = parent["parts"] if "parts" in parent else [parent]
    names = {id(p): n for n, p in model.named_parameters()}
    layout_child = [[[names[id(p)] for p in g["params"]] for g in part.param_groups] for part in opt.parts]
    layout_parent = [[list(g["params"]) for g in s["param_groups"]] for s in parts]
    if [[len(g) for g in part] for part in layout_child] != [[len(g) for g in part] for part in layout_parent]:
        raise ConfigError("warm start: the parent's optimizer holds its parameters differently from the child's "
                          "(optim.optimizer, optim.negatives or optim.row_sparse differ); use the parent's optim "
                          "settings, or train without --warm-start")
    out = []
    for part_state, part_names, child_part in zip(parts, layout_child, child["parts"]):
        order = [n for group in part_names for n in group]
        state = {}
        for idx, entry in part_state["state"].items():
            name = order[int(idx)]
            state[idx] = {key: (_remap_moment(v, items) if name in item_keys and isinstance(v, torch.Tensor)
                                and v.dim() >= 1 and v.shape[0] == items.n_parent else v)
                          for key, v in entry.items()}
        # the child's hyper-parameters (its optim.lr), the parent's moments
        out.append({"state": state, "param_groups": child_part["param_groups"]})
    return {"parts": out}


def _remap_moment(parent: torch.Tensor, items: ItemMap) -> torch.Tensor:
    """An optimizer moment of an item table: carried rows kept, new rows zero (a fresh row's moments)."""
    if parent.is_sparse:
        parent = parent.to_dense()
    fresh = torch.zeros((len(items.parent_row), *parent.shape[1:]), dtype=parent.dtype)
    return carry_rows(parent, fresh, items)


def prepare_warm_start(cfg: Config, meta: dict) -> dict | None:
    """Driver: for a warm-started run without a checkpoint yet, build <run>/warm_start.pt and record the parent in
    run.json. Returns the lineage (run, epoch, vocabulary fingerprint, item counts), or None (no parent, or a
    resumed run that already holds checkpoints: it continues from them)."""
    if not cfg.run.warm_start:
        return None
    record_uri = lake.join(run_uri(cfg), RUN_FILE)
    if holds_checkpoint(cfg):
        return lake.read_json(record_uri).get("parent")
    parent = cfg.run.warm_start
    if parent == cfg.run.name:
        raise ConfigError(f"run.warm_start={parent!r} is this run itself; warm-start from a finished earlier run")
    state = parent_checkpoint(cfg.data.lake, parent)
    parent_vocab = read_vocabulary(cfg.data.lake, parent)
    child_vocab = lake.read_table(lake.join(layout.snapshot_uri(cfg.data.lake, cfg.data.dataset, cfg.data.version),
                                            "items"), ["item_idx", "item_id"]).sort_by("item_idx")
    if parent_vocab.num_rows != state["n_items"]:
        raise CheckpointError(f"{layout.run_uri(cfg.data.lake, parent)}: its vocabulary has {parent_vocab.num_rows} "
                              f"items but its checkpoint {state['n_items']}; the run folder is damaged")
    items = match_items(parent_vocab["item_id"].combine_chunks(), child_vocab["item_id"].combine_chunks())
    initial = build_initial(cfg, state, items,
                            train_chunks(cfg.data.lake, cfg.data.dataset, cfg.data.version),
                            meta["vocabulary_fingerprint"])
    buf = io.BytesIO()
    torch.save(initial, buf)
    lake.write_bytes(lake.join(run_uri(cfg), INITIAL_FILE), buf.getvalue())
    lineage = {"run": parent, "epoch": int(state["epoch"]), "vocabulary_fingerprint": state["vocabulary_fingerprint"],
               "items": initial["extra"]["warm_start"]}
    lake.write_json(record_uri, lake.read_json(record_uri) | {"parent": lineage})
    return lineage


def load_initial(cfg: Config, fingerprint: str) -> dict:
    """A worker: the initial checkpoint the driver built (refused for another vocabulary)."""
    return checkpoint.load(lake.join(run_uri(cfg), INITIAL_FILE), fingerprint)
