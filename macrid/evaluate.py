"""Fold-in evaluation: score held-out users from their fold-in items, rank all items, compare with targets."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from macrid.batches import HeldOut, bag_rows
from macrid.metrics import independence, mean_se, ndcg_at_k, recall_at_k, targets_mask, top_k

# (indices (N,), offsets (B+1,)) -> (scores (B, M), representations (B, K, D) or None)
Scorer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
KS = {"ndcg": (100,), "recall": (20, 50)}


def evaluate(scorer: Scorer, split: HeldOut, n_items: int, batch_size: int = 1000) -> dict:
    """Returns {"ndcg@100": (mean, se), "recall@20": ..., "recall@50": ..., "independence": ..., "users": n}."""
    per_user: dict[str, list[np.ndarray]] = {f"{m}@{k}": [] for m, ks in KS.items() for k in ks}
    reps = []
    k_max = max(k for ks in KS.values() for k in ks)
    skipped = 0
    for start in range(0, split.foldin.n_rows, batch_size):
        rows = np.arange(start, min(start + batch_size, split.foldin.n_rows))
        f_idx, f_off = split.foldin.take(rows)
        t_idx, t_off = split.heldout.take(rows)
        with torch.no_grad():
            scores, rep = scorer(f_idx, f_off)
        scores = scores.float().clone()  # (B, M)
        scores[bag_rows(f_off), f_idx] = -torch.inf  # fold-in items never count
        n_targets = t_off.diff()  # (B,)
        keep = n_targets > 0
        skipped += int((~keep).sum())
        hits = targets_mask(top_k(scores, k_max), t_idx, t_off, n_items)[keep]  # (B', k_max)
        n_targets = n_targets[keep]
        for k in KS["ndcg"]:
            per_user[f"ndcg@{k}"].append(ndcg_at_k(hits, n_targets, k).numpy())
        for k in KS["recall"]:
            per_user[f"recall@{k}"].append(recall_at_k(hits, n_targets, k).numpy())
        if rep is not None:
            reps.append(rep.reshape(-1, rep.shape[-1]).numpy())
    result: dict = {name: mean_se(np.concatenate(v)) for name, v in per_user.items()}
    result["users"] = int(sum(len(v) for v in per_user["ndcg@100"]))
    result["users_without_targets"] = skipped
    if reps:
        result["independence"] = independence(np.concatenate(reps))
    return result


def chunked_top_k(model: torch.nn.Module, indices: torch.Tensor, offsets: torch.Tensor, n_items: int, k: int,
                  chunk: int = 65536) -> torch.Tensor:
    """Top-k items (B, k) over all M items with bounded memory: B x chunk scores at a time.

    Fold-in items are excluded; ties go to the lower item index, exactly as `top_k` on full scores,
    because chunks are visited in index order and merged with a stable sort.
    """
    model.eval()
    B = len(offsets) - 1
    mu = model.represent(indices, offsets)
    rows = bag_rows(offsets)
    best_s = torch.full((B, 0), -torch.inf)
    best_i = torch.zeros((B, 0), dtype=torch.long)
    for lo in range(0, n_items, chunk):
        items = torch.arange(lo, min(lo + chunk, n_items))
        s = model.score(mu, items).float()  # (B, C)
        inside = (indices >= lo) & (indices < lo + len(items))
        s[rows[inside], indices[inside] - lo] = -torch.inf
        cat_s = torch.cat([best_s, s], 1)
        cat_i = torch.cat([best_i, items.expand(B, -1)], 1)
        order = torch.sort(cat_s, dim=1, descending=True, stable=True).indices[:, :k]
        best_s, best_i = torch.gather(cat_s, 1, order), torch.gather(cat_i, 1, order)
    return best_i


def torch_scorer(model: torch.nn.Module) -> Scorer:
    """Scores of a macrid model in evaluation mode (concept mode, z = mu, no dropout)."""
    model.eval()

    def score(indices: torch.Tensor, offsets: torch.Tensor):
        out = model(indices, offsets)
        return out.log_scores, out.mu

    return score


def dense_rows(indices: torch.Tensor, offsets: torch.Tensor, n_items: int) -> torch.Tensor:
    """CSR batch -> dense (B, M) 0/1 matrix. For the closed-form baselines only (small M)."""
    x = torch.zeros(len(offsets) - 1, n_items)
    x[bag_rows(offsets), indices] = 1.0
    return x
