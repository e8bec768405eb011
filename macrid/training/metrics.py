"""Ranking metrics exactly as MultVAE computes them, plus the independence score of Sec. 3.4.

Conventions (written down because papers differ):
- scores of fold-in items are set to -inf before ranking, so they never count;
- ties are broken by the lower item index (a stable sort), so results are deterministic;
- NDCG@k = DCG@k / IDCG where IDCG sums 1/log2(r+2) over r < min(k, #targets);
- Recall@k = hits in the top k / min(k, #targets);
- users with no targets are skipped (they carry no signal) and counted separately.
"""

from __future__ import annotations

import numpy as np
import torch

from macrid.data.bags import bag_rows


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, M) -> (B, k) item indices, highest first, ties to the lower index."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def targets_mask(ranked: torch.Tensor, heldout_idx: torch.Tensor, heldout_off: torch.Tensor, n_items: int) -> torch.Tensor:
    """(B, k) ranked items + CSR targets -> (B, k) bool, True where the ranked item is a target.

    Membership of (user, item) keys: O(B*k + targets), no B x M matrix, so it holds at any M.
    """
    B = len(heldout_off) - 1
    ranked_keys = torch.arange(B, device=ranked.device).unsqueeze(1) * n_items + ranked  # (B, k)
    target_keys = bag_rows(heldout_off, len(heldout_idx)).to(ranked.device) * n_items + heldout_idx.to(ranked.device)
    return torch.isin(ranked_keys, target_keys)


def ndcg_at_k(hits: torch.Tensor, n_targets: torch.Tensor, k: int) -> torch.Tensor:
    """hits (B, >=k) bool in rank order, n_targets (B,) -> (B,) NDCG@k."""
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=hits.device))  # (k,)
    kk = min(k, hits.shape[1])  # a catalogue smaller than k ranks fewer than k items
    dcg = (hits[:, :kk].double() * discount[:kk]).sum(1)
    idcg = torch.cumsum(discount, 0)[(n_targets.clamp(1, k) - 1)]
    return dcg / idcg


def recall_at_k(hits: torch.Tensor, n_targets: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) hits@k / min(k, #targets)."""
    return hits[:, :k].double().sum(1) / n_targets.clamp(1, k).double()


def independence(reps: np.ndarray) -> float:
    """1 - 2/(d(d-1)) * sum_{i<j} |corr_ij| over the d dimensions of a set of representations (Sec. 3.4).

    reps: (n, d). Constant dimensions have no defined correlation and count as independent.
    """
    x = np.asarray(reps, dtype=np.float64)
    d = x.shape[1]
    if d < 2:
        return 1.0
    x = x - x.mean(0)
    std = x.std(0)
    ok = std > 1e-12
    corr = np.zeros((d, d))
    xs = x[:, ok] / std[ok]
    corr[np.ix_(ok, ok)] = xs.T @ xs / len(x)
    upper = np.abs(corr[np.triu_indices(d, k=1)])
    return float(1.0 - upper.mean())


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error (std / sqrt(n)), as MultVAE reports."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std() / np.sqrt(len(v)))


def nmi(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Normalised mutual information (arithmetic-mean normalisation) of two labelings of the same items."""
    a = np.unique(np.asarray(labels_a), return_inverse=True)[1]
    b = np.unique(np.asarray(labels_b), return_inverse=True)[1]
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    ha, hb = -float((pa * np.log(pa)).sum()), -float((pb * np.log(pb)).sum())
    return mi / ((ha + hb) / 2) if ha + hb > 0 else 1.0


def _contingency(labels_a: np.ndarray, labels_b: np.ndarray) -> np.ndarray:
    """(A, B) counts of items with label a in the first labeling and b in the second."""
    a = np.unique(np.asarray(labels_a), return_inverse=True)[1]
    b = np.unique(np.asarray(labels_b), return_inverse=True)[1]
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1.0)
    return table


def ari(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Adjusted Rand index (Hubert and Arabie, 1985) of two labelings of the same items."""
    table = _contingency(labels_a, labels_b)
    pairs = lambda x: (x * (x - 1) / 2).sum()  # noqa: E731  number of pairs within each count, summed
    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array([table.sum()]))
    expected = rows * cols / total if total else 0.0
    best = (rows + cols) / 2
    return float((index - expected) / (best - expected)) if best != expected else 1.0


def purity(learned: np.ndarray, truth: np.ndarray) -> float:
    """Share of items whose learned cluster's majority true label is their own."""
    table = _contingency(learned, truth)
    return float(table.max(1).sum() / table.sum())
