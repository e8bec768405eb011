"""Closed-form baselines: item popularity and EASE (Steck 2019)."""

from __future__ import annotations

import os

import numpy as np
import torch

from macrid.data.batches import CSR
from macrid.errors import ConfigError
from macrid.data.bags import dense_rows
from macrid.model.scorer import Scorer

EASE_MATRICES = 4  # M x M float64 matrices alive at EASE's peak: G, G + lam I, its inverse P, and -P / diag(P)


def popularity_scorer(train: CSR, n_items: int) -> Scorer:
    pop = torch.from_numpy(train.item_counts(n_items)).float()  # (M,)
    return lambda indices, offsets: (pop.expand(len(offsets) - 1, n_items), None)


def ease_bytes(n_items: int) -> int:
    """The memory EASE needs at its peak: EASE_MATRICES float64 M x M matrices."""
    return EASE_MATRICES * 8 * n_items * n_items


def gram(train: CSR, n_items: int, memory_bytes: int | None = None) -> torch.Tensor:
    """X^T X of the training bags, (M, M) float64: computed once, shared by every lambda tried.

    Refused up front when EASE's peak memory exceeds `memory_bytes` (default: this machine's RAM)."""
    memory_bytes = memory_bytes or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if ease_bytes(n_items) > memory_bytes:
        raise ConfigError(f"EASE on M={n_items:,} items needs about {ease_bytes(n_items) / 2**30:.1f} GiB "
                          f"({EASE_MATRICES} M x M float64 matrices); this machine has {memory_bytes / 2**30:.1f} "
                          "GiB. Run jobs/baselines.py on a machine with more memory, or compare with MacridVAE, "
                          "whose memory grows linearly in M")
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
