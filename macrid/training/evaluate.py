"""Fold-in evaluation: score held-out users from their fold-in items, rank all items, compare with targets.

Models rank with `chunked_top_k`: scores for a block of items at a time and a running top-k, so
memory stays bounded at any catalogue size (10^6 items and more). The closed-form baselines
(popularity, EASE: small M by construction) score all items at once. `max_users` evaluates a
fixed random sample of the held-out users when a full pass would cost too much.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from macrid.data.bags import bag_rows, to_device
from macrid.model.scorer import Scorer
from macrid.training.metrics import independence, mean_se, ndcg_at_k, recall_at_k, targets_mask, top_k

if TYPE_CHECKING:  # keeps this module importable without the lake's I/O stack (benchmarks/gpu.py)
    from macrid.data.batches import HeldOut

# (indices (N,), offsets (B+1,), k) -> (top-k item ids (B, k) without fold-in items, representations or None)
Ranker = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor | None]]
KS = {"ndcg": (100,), "recall": (20, 50)}
SCORE_BUDGET = 2**26  # floats in one block of B x K x items scores (256 MB)


def evaluate(ranker: Ranker, split: "HeldOut", n_items: int, batch_size: int = 1000, max_users: int = 0,
             seed: int = 0) -> dict:
    """Returns {"ndcg@100": (mean, se), "recall@20": ..., "recall@50": ..., "independence": ..., "users": n}."""
    per_user: dict[str, list[np.ndarray]] = {f"{m}@{k}": [] for m, ks in KS.items() for k in ks}
    reps = []
    k_max = max(k for ks in KS.values() for k in ks)
    n_rows = split.foldin.n_rows
    sampled = 0 < max_users < n_rows
    users = np.sort(np.random.default_rng(seed).choice(n_rows, max_users, replace=False)) if sampled \
        else np.arange(n_rows)
    skipped = 0
    for start in range(0, len(users), batch_size):
        rows = users[start:start + batch_size]
        f_idx, f_off = split.foldin.take(rows)
        t_idx, t_off = split.heldout.take(rows)
        with torch.no_grad():
            ranked, rep = ranker(f_idx, f_off, k_max)  # on the model's device
        ranked = ranked.cpu()
        rep = rep.cpu() if rep is not None else None
        n_targets = t_off.diff()  # (B,)
        keep = n_targets > 0
        skipped += int((~keep).sum())
        hits = targets_mask(ranked, t_idx, t_off, n_items)[keep]  # (B', k_max)
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
    if sampled:
        result["sampled_from"] = n_rows
    if reps:
        result["independence"] = independence(np.concatenate(reps))
    return result


def score_budget(device: torch.device) -> int:
    """Floats in one block of B x K x items scores: 2^26 (256 MB) on the CPU; on a GPU a sixteenth of its
    free memory (an 80 GB card scores ~5 GB blocks: fewer, larger chunks, fewer kernel launches)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(SCORE_BUDGET, free // 16 // 4)
    return SCORE_BUDGET


def chunked_top_k(model: torch.nn.Module, indices: torch.Tensor, offsets: torch.Tensor, n_items: int, k: int,
                  chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k items (B, k) over all M items with bounded memory, and the users' representations.

    Runs on the model's device (the batch is moved there). Scores B x chunk items at a time
    (chunk = 0: as many as `score_budget` allows). Fold-in items are
    excluded; ties go to the lower item index, exactly as `top_k` on full scores, because chunks are
    visited in index order and merged with a stable sort. No step of the loop waits for the host: the
    fold-in mask is a fixed-size scatter, and the merge selects columns with topk, not nonzero.
    """
    model.eval()
    device = next(model.parameters(), indices).device  # a parameterless scorer: the batch's device
    indices, offsets = to_device(indices, device), to_device(offsets, device)
    B = len(offsets) - 1
    mu = model.represent(indices, offsets)  # (B, K, D)
    chunk = chunk or max(1024, score_budget(device) // max(1, B * mu.shape[1]))
    rows = bag_rows(offsets, len(indices))  # (N,)
    best_s = torch.full((B, 0), -torch.inf, device=device)  # (B, k) running best scores
    best_i = torch.zeros((B, 0), dtype=torch.long, device=device)  # (B, k) their item ids
    for lo in range(0, n_items, chunk):
        C = min(chunk, n_items - lo)
        items = torch.arange(lo, lo + C, device=device)  # (C,)
        s = model.score(mu, items).float()  # (B, C)
        col = indices - lo  # (N,)
        inside = (col >= 0) & (col < C)
        # every fold-in item adds -inf (inside the chunk) or 0 (outside, at a clamped column): a fixed-size
        # scatter, where s[rows[inside], ...] would wait on the host for the number of items inside
        s.index_put_((rows, col.clamp(0, C - 1)), torch.where(inside, -torch.inf, 0.0), accumulate=True)
        best_s, best_i = _merge_top_k(best_s, best_i, s, lo, k)
    return best_i, mu


def _merge_top_k(best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, lo: int,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of the running best (B, k') and a chunk's scores (B, C) of items lo..lo+C-1, highest first,
    ties to the earlier column (= the lower item id, since the running best precedes the chunk and both
    are in id order among equal scores).

    topk finds the k-th value; everything above it is kept, then the earliest columns equal to it; a second
    topk over the kept mask picks those columns in column order (no nonzero, so no host sync). The chunk's
    item ids are computed from the chosen columns, never materialised as a (B, C) table.
    A full stable sort of B x chunk scores costs 2.5x more (`python benchmarks/scale.py parts`).
    """
    scores = torch.cat([best_s, s], 1)  # (B, W), W = k' + C
    prev, W = best_s.shape[1], scores.shape[1]
    k = min(k, W)
    kth = torch.topk(scores, k, dim=1, sorted=False).values.min(1, keepdim=True).values  # (B, 1)
    greater, equal = scores > kth, scores == kth
    keep = greater | (equal & (equal.cumsum(1) <= k - greater.sum(1, keepdim=True)))  # exactly k per row
    rank = torch.arange(W, 0, -1, device=scores.device)  # (W,) earlier columns rank higher
    cols = torch.topk(keep * rank, k, dim=1, sorted=True).indices  # (B, k) the kept columns, in column order
    chosen = torch.gather(scores, 1, cols)
    from_best = cols < prev
    ids = torch.where(from_best, torch.gather(best_i, 1, cols.clamp_max(max(prev - 1, 0))) if prev else cols,
                      cols - prev + lo)  # (B, k)
    order = torch.sort(chosen, dim=1, descending=True, stable=True).indices
    return torch.gather(chosen, 1, order), torch.gather(ids, 1, order)


def model_ranker(model: torch.nn.Module, n_items: int) -> Ranker:
    """A macrid model in evaluation mode (concept mode, z = mu, no dropout), ranked chunk by chunk."""
    model.eval()
    return lambda indices, offsets, k: chunked_top_k(model, indices, offsets, n_items, k)


def scores_ranker(scorer: Scorer) -> Ranker:
    """Full (B, M) scores -> top-k without the fold-in items. For the closed-form baselines."""
    def rank(indices: torch.Tensor, offsets: torch.Tensor, k: int):
        scores, rep = scorer(indices, offsets)
        scores = scores.float().clone()
        scores[bag_rows(offsets, len(indices)), indices] = -torch.inf  # fold-in items never count
        return top_k(scores, k), rep
    return rank
