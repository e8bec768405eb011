"""The gate before anything is published: a candidate run against the run a model alias points to now.

Both models are scored on the same users: the candidate dataset's validation users, each folded in from the
items of its fold-in bag that the model knows (items matched by ID), ranked over the model's own catalogue,
and compared by ID with all of the user's held-out items; a held-out item a model does not know is a miss
for it. The comparison is the paired per-user difference of NDCG@100, candidate minus current, with its
standard error (std with n - 1 over sqrt(n)) and z = mean / SE.

The candidate is promoted unless it is worse: by default, unless z <= min_z (-2: significantly worse); with
max_drop, unless the mean difference is below -max_drop; and, with floor, unless its own NDCG@100 is below
floor. The first promotion of a name only checks that the candidate finished with finite metrics.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from macrid.data import lake, layout
from macrid.data.batches import CSR, HeldOut, load_dataset
from macrid.errors import CheckpointError
from macrid.training import registry
from macrid.training.evaluate import chunked_top_k
from macrid.training.metrics import ndcg_at_k, targets_mask
from macrid.training.run_folder import METRICS_FILE, MODEL_FILE, RUN_FILE, read_vocabulary
from macrid.training.checkpoint import load_model
from macrid.training.warm_start import match_items

K = 100


@dataclass(frozen=True)
class GateRule:
    min_z: float = -2.0  # refuse when z <= min_z (the default rule)
    max_drop: float | None = None  # refuse when mean(candidate - current) < -max_drop (replaces the z rule)
    floor: float | None = None  # refuse when the candidate's NDCG@100 on these users is below this


@dataclass(frozen=True)
class Decision:
    model: str
    candidate: str
    current: str | None
    promoted: bool
    reason: str
    users: int = 0
    candidate_ndcg: float = math.nan
    current_ndcg: float = math.nan
    difference: float = math.nan
    se: float = math.nan
    z: float = math.nan

    def message(self) -> str:
        verdict = "promoted" if self.promoted else "refused"
        if self.current is None:
            return f"{self.candidate} {verdict} as model {self.model!r} (its first run): {self.reason}"
        return (f"{self.candidate} {verdict} as model {self.model!r}: NDCG@100 on {self.users} validation users "
                f"{self.candidate_ndcg:.4f} (candidate) vs {self.current_ndcg:.4f} ({self.current}), difference "
                f"{self.difference:+.4f} (SE {self.se:.4f}, z {self.z:+.2f}); {self.reason}")


def finished_metrics(lake_root: str, run: str) -> dict:
    """A finished run's metrics.json; a CheckpointError when it is unfinished or its scores are not finite."""
    folder = layout.run_uri(lake_root, run)
    for name in (METRICS_FILE, MODEL_FILE):
        if not lake.exists(lake.join(folder, name)):
            raise CheckpointError(f"{folder}: no {name}, so the run has not finished (still training, or failed); "
                                  "promote a finished run")
    metrics = lake.read_json(lake.join(folder, METRICS_FILE))
    scores = [metrics[s][m][0] for s in ("val", "test") for m in ("ndcg@100", "recall@20", "recall@50")]
    if not all(math.isfinite(v) for v in scores):
        raise CheckpointError(f"{folder}: its validation or test metrics are not finite ({scores}); the run "
                              "diverged: it cannot be promoted")
    return metrics


def paired_ndcg(lake_root: str, candidate: str, current: str, max_users: int = 0, device: str = "cpu"
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per-user NDCG@100 of both runs on the candidate dataset's validation users: (candidate (U,), current (U,))."""
    record = lake.read_json(lake.join(layout.run_uri(lake_root, candidate), RUN_FILE))
    data = load_dataset(lake_root, record["dataset"], with_train=False, version=record.get("version", ""))
    ids = read_vocabulary(lake_root, candidate)["item_id"].combine_chunks()
    split = _sample(data.val, max_users)
    return tuple(_ndcg_by_id(lake_root, run, ids, split, device) for run in (candidate, current))


def decide(lake_root: str, name: str, candidate: str, rule: GateRule = GateRule(), max_users: int = 0,
           device: str = "cpu") -> Decision:
    """Compare and decide, without moving the alias."""
    finished_metrics(lake_root, candidate)
    current = registry.current(lake_root, name)
    if current is None:
        return Decision(name, candidate, None, True, "its metrics are finite")
    cand, cur = paired_ndcg(lake_root, candidate, current["run"], max_users, device)
    d = cand - cur
    n = len(d)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    mean = float(d.mean())
    z = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    if rule.floor is not None and cand.mean() < rule.floor:
        promoted, reason = False, f"its NDCG@100 is below the floor {rule.floor:g}"
    elif rule.max_drop is not None:
        promoted = mean >= -rule.max_drop
        reason = f"the drop limit is {rule.max_drop:g}"
    else:
        promoted = z > rule.min_z
        reason = f"refused at z <= {rule.min_z:g}" if not promoted else f"not significantly worse (z > {rule.min_z:g})"
    return Decision(name, candidate, current["run"], promoted, reason, n, float(cand.mean()), float(cur.mean()),
                    mean, se, z)


def promote(lake_root: str, name: str, candidate: str, rule: GateRule = GateRule(), max_users: int = 0,
            device: str = "cpu") -> Decision:
    """The gate: decide, record the decision in the alias's history, and move the alias only when promoted."""
    decision = decide(lake_root, name, candidate, rule, max_users, device)
    details = {k: v for k, v in asdict(decision).items() if k not in ("model", "promoted")}
    details = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in details.items()}
    registry.record(lake_root, name, {"event": "promoted" if decision.promoted else "refused"} | details)
    if decision.promoted:
        registry.point(lake_root, name, candidate, {"previous": decision.current, "gate": details})
    return decision


def _ndcg_by_id(lake_root: str, run: str, ids, split: HeldOut, device: str) -> np.ndarray:
    """(U,) NDCG@100 of one run on users whose items are candidate-vocabulary indices into `ids`."""
    ranked = ranked_by_id(lake_root, run, ids, split.foldin, K, device)  # (U, K)
    hits = targets_mask(torch.from_numpy(ranked), torch.from_numpy(split.heldout.indices),
                        torch.from_numpy(split.heldout.indptr), len(ids) + 1)
    return ndcg_at_k(hits, torch.from_numpy(np.diff(split.heldout.indptr)), K).numpy()


def ranked_by_id(lake_root: str, run: str, ids, foldin: CSR, k: int, device: str = "cpu") -> np.ndarray:
    """One run's top-k for users given in another vocabulary: (U, k) indices into `ids` (item IDs in
    item_idx order), len(ids) where the run recommends an item `ids` does not hold.

    Each user is folded in from the items of its bag that the run knows (matched by ID); its own known items
    are never recommended; the run ranks its whole catalogue chunk by chunk (bounded memory)."""
    model, _ = load_model(layout.run_uri(lake_root, run))
    model = model.to(device)
    own = read_vocabulary(lake_root, run)["item_id"].combine_chunks()
    to_model = match_items(own, ids).parent_row  # (M_ids,) the model's row of each item of `ids`, -1 unknown
    to_ids = match_items(ids, own).parent_row  # (M_model,) the index in `ids` of each model item, -1 unknown
    to_ids = np.where(to_ids < 0, len(ids), to_ids)
    out = []
    for start in range(0, foldin.n_rows, 1000):
        rows = np.arange(start, min(start + 1000, foldin.n_rows))
        bags = _mapped(foldin, rows, to_model)
        with torch.no_grad():
            ranked, _ = chunked_top_k(model, *bags.take(np.arange(len(rows))), len(own), k)
        out.append(to_ids[ranked.cpu().numpy()])  # (B, k)
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def _mapped(bags: CSR, rows: np.ndarray, to_model: np.ndarray) -> CSR:
    """The bags of `rows` in the model's indices, without the items it does not know."""
    idx, off = bags.take(rows)
    mapped = to_model[idx.numpy()]
    keep = mapped >= 0
    user = np.repeat(np.arange(len(rows)), np.diff(off.numpy()))  # (N,) the batch row of each item
    lengths = np.bincount(user[keep], minlength=len(rows))  # (B,) known items per user
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return CSR(indptr, mapped[keep].astype(np.int64))


def _sample(split: HeldOut, max_users: int) -> HeldOut:
    """All users with a held-out item, or a fixed sample of max_users of them."""
    users = np.flatnonzero(np.diff(split.heldout.indptr) > 0)
    if 0 < max_users < len(users):
        users = np.sort(np.random.default_rng(0).choice(users, max_users, replace=False))
    return HeldOut(split.user_idx[users], _rows(split.foldin, users), _rows(split.heldout, users))


def _rows(csr: CSR, rows: np.ndarray) -> CSR:
    idx, off = csr.take(rows)
    return CSR(off.numpy(), idx.numpy())
