"""The beta-weighted ELBO (Eq. 5) as a pure function of the batch and the step."""

from __future__ import annotations

import torch

from macrid.batches import bag_rows
from macrid.model import Output


def beta_at(step: int, steps_per_epoch: int, beta_cap: float, anneal_epochs: float) -> float:
    """beta rises linearly from 0 and reaches `beta_cap` after `anneal_epochs` epochs of updates."""
    if anneal_epochs <= 0:
        return beta_cap
    return beta_cap * min(1.0, step / (anneal_epochs * steps_per_epoch))


def multinomial_nll(log_scores: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                    log_pi: torch.Tensor | None = None) -> torch.Tensor:
    """-sum_{i in x_u} log softmax(log_scores_u)_i, averaged over the B users. Returns a scalar.

    log_scores (B, M) over all items, or (B, C) over candidates with `indices` giving positions in C
    and `log_pi` (C,) the candidates' log inclusion probabilities (sampled softmax, see sampling.py).
    Only the user's own items are gathered, so the (B, M) log-softmax is never materialised.
    """
    B = len(offsets) - 1
    rows = bag_rows(offsets)  # (N,)
    corrected = log_scores if log_pi is None else log_scores - log_pi
    log_z = torch.logsumexp(corrected, dim=1)  # (B,) log of the Horvitz-Thompson estimate of Z_u
    return -(log_scores[rows, indices].sum() - (log_z * offsets.diff()).sum()) / B


def elbo_loss(out: Output, indices: torch.Tensor, offsets: torch.Tensor, beta: float,
              log_pi: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Negative Eq. 5 per user: reconstruction NLL + beta * KL. Returns (loss, parts for logging)."""
    nll = multinomial_nll(out.log_scores, indices, offsets, log_pi)
    kl = out.kl.mean()
    return nll + beta * kl, {"nll": nll.item(), "kl": kl.item(), "beta": beta}
