"""Sampled softmax: a candidate set per batch and the log-Q (inclusion-probability) correction.

Full softmax normalises p(i | u) over all M items. For large M, each batch instead uses
candidates C = (items of the batch's users) ∪ (S negatives drawn from a proposal Q, shared by the
batch). The normaliser is estimated by Horvitz-Thompson:

    Z_u ≈ Σ_{j∈C} A_uj / π_j,   π_j = 1 for the batch's own items, π_j = 1 - (1 - Q_j)^S for the others,

where π_j is the probability that item j is in C. The estimate of Z_u is unbiased; its log is
biased low by about Var(Ẑ)/(2 Z²) (Jensen), which shrinks as S grows and as Q approaches the
model's own distribution; docs/sampled_softmax.md has the derivation. With C = all items every
π_j = 1 and the loss is exactly the full softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Candidates:
    items: torch.Tensor  # (C,) sorted unique item ids
    log_pi: torch.Tensor  # (C,) log inclusion probability, 0 for the batch's own items
    negatives: torch.Tensor | None = None  # (S',) positions in `items` of the distinct sampled negatives
    log_pi_negatives: torch.Tensor | None = None  # (S',) their inclusion probability for a user not holding them

    def positions(self, indices: torch.Tensor) -> torch.Tensor:
        """Item ids (N,) that are candidates -> their positions in `items` (N,)."""
        return torch.searchsorted(self.items, indices)


class NegativeSampler:
    """Draws S negatives per batch from Q ∝ count^alpha (alpha = 0: uniform), with replacement."""

    def __init__(self, item_counts: np.ndarray, n_samples: int, alpha: float, seed: int = 0,
                 device: torch.device | str = "cpu"):
        weights = np.power(np.asarray(item_counts, dtype=np.float64) + 1.0, alpha)  # +1: unseen items stay possible
        self.q = torch.from_numpy(weights / weights.sum()).to(device)  # (M,) float64
        self.cdf = torch.cumsum(self.q, 0)  # inverse-CDF draws: O(S log M) per batch, not O(M)
        self.n_samples = n_samples
        self.generator = torch.Generator(device=self.q.device).manual_seed(seed)

    def sample(self) -> torch.Tensor:
        """(S,) item ids, with repetitions, on the sampler's device."""
        u = torch.rand(self.n_samples, dtype=torch.float64, generator=self.generator,
                       device=self.q.device) * self.cdf[-1]
        return torch.searchsorted(self.cdf, u, right=True).clamp_max(len(self.q) - 1)

    def candidates(self, batch_items: torch.Tensor) -> Candidates:
        """Candidates for a batch whose users hold `batch_items` (N,), on the sampler's device.

        Sizes are data-dependent, so on CUDA this syncs with the host twice per step: once for the number of
        candidates (one `torch.unique` over positives and draws together) and once for the number of distinct
        negatives (a `nonzero` over a (C,) mask). Everything else stays on the device.
        """
        N = len(batch_items)
        items, inverse = torch.unique(torch.cat([batch_items, self.sample()]), return_inverse=True)  # (C,) sorted
        is_positive = torch.zeros(len(items), dtype=torch.bool, device=items.device)  # (C,)
        is_positive[inverse[:N]] = True
        is_negative = torch.zeros_like(is_positive)
        is_negative[inverse[N:]] = True
        q = self.q[items]
        log_pi = torch.log1p(-torch.pow(1.0 - q, self.n_samples)).float()  # (C,)
        negative_pos = is_negative.nonzero().squeeze(1)  # (S',) distinct sampled negatives, in item order
        log_pi_negatives = log_pi[negative_pos]  # a gather: a copy, unaffected by the masking below
        log_pi = log_pi.masked_fill(is_positive, 0.0)
        return Candidates(items, log_pi, negative_pos, log_pi_negatives)


def all_items(n_items: int, device: torch.device | str = "cpu") -> Candidates:
    ids, zeros = torch.arange(n_items, device=device), torch.zeros(n_items, device=device)  # (M,), (M,)
    return Candidates(ids, zeros, ids, zeros)
