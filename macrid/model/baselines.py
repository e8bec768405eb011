"""Closed-form baselines: item popularity and EASE (Steck 2019)."""

from __future__ import annotations

import numpy as np
import torch

from macrid.data.batches import CSR
from macrid.errors import ConfigError
from macrid.training.evaluate import Scorer, dense_rows

EASE_MAX_ITEMS = 60_000  # the M x M inverse costs M^2 * 8 bytes and O(M^3) time


def popularity_scorer(train: CSR, n_items: int) -> Scorer:
    pop = torch.from_numpy(train.item_counts(n_items)).float()  # (M,)
    return lambda indices, offsets: (pop.expand(len(offsets) - 1, n_items), None)


def gram(train: CSR, n_items: int) -> torch.Tensor:
    """X^T X of the training bags, (M, M) float64: computed once, shared by every lambda tried."""
    if n_items > EASE_MAX_ITEMS:
        raise ConfigError(f"EASE needs an M x M inverse; M={n_items} exceeds {EASE_MAX_ITEMS}. Use MacridVAE")
    G = torch.zeros(n_items, n_items, dtype=torch.float64)
    for start in range(0, train.n_rows, 5000):
        rows = np.arange(start, min(start + 5000, train.n_rows))
        x = dense_rows(*train.take(rows), n_items).double()  # (B, M)
        G += x.T @ x
    return G


def ease_weights(G: torch.Tensor, lam: float) -> torch.Tensor:
    """B = I - P / diag(P) with P = (G + lam I)^-1, so diag(B) = 0. Returns (M, M)."""
    P = torch.linalg.inv(G + lam * torch.eye(len(G), dtype=G.dtype))
    W = -P / P.diagonal().unsqueeze(0)
    W.diagonal().zero_()
    return W.float()


def ease_scorer(G: torch.Tensor, lam: float) -> Scorer:
    """EASE with L2 weight `lam` on the Gram matrix `G` from `gram`."""
    W = ease_weights(G, lam)
    return lambda indices, offsets: (dense_rows(indices, offsets, len(G)) @ W, None)
