"""The beta-weighted ELBO (Eq. 5) as a pure function of the batch and the step."""

from __future__ import annotations

import math

import torch

from macrid.data.bags import bag_rows


def beta_at(step: int, steps_per_epoch: int, beta_cap: float, anneal_epochs: float, schedule: str = "linear"
            ) -> float:
    """beta rises linearly from 0 and reaches `beta_cap` after `anneal_epochs` epochs of updates ("linear"),
    or at the authors' fixed rate of 1/5 per epoch, reaching the cap after 5 * beta_cap epochs ("authors")."""
    if schedule == "authors":
        return min(beta_cap, step / (5.0 * steps_per_epoch))
    if anneal_epochs <= 0:
        return beta_cap
    return beta_cap * min(1.0, step / (anneal_epochs * steps_per_epoch))


def lr_at(step: int, total_steps: int, lr: float, schedule: str = "constant") -> float:
    """The learning rate of update `step`: constant, or "cosine": lr * (1 + cos(pi * step / total)) / 2,
    from lr at step 0 down to 0 at the last update."""
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    return lr


def multinomial_nll(log_scores: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                    log_pi: torch.Tensor | None = None) -> torch.Tensor:
    """-sum_{i in x_u} log softmax(log_scores_u)_i, averaged over the B users. Returns a scalar.

    log_scores (B, M) over all items, or (B, C) over candidates with `indices` giving positions in C
    and `log_pi` (C,) the candidates' log inclusion probabilities (sampled softmax, see sampling.py).
    Only the user's own items are gathered, so the (B, M) log-softmax is never materialised.
    """
    B = len(offsets) - 1
    rows = bag_rows(offsets, len(indices))  # (N,)
    log_scores = log_scores.float()
    corrected = log_scores if log_pi is None else log_scores - log_pi
    log_z = torch.logsumexp(corrected, dim=1)  # (B,) log of the Horvitz-Thompson estimate of Z_u
    return -(log_scores[rows, indices].sum() - (log_z * offsets.diff()).sum()) / B


def own_items_nll(log_pos: torch.Tensor, log_neg: torch.Tensor, negatives: torch.Tensor, log_pi_neg: torch.Tensor,
                  indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The multinomial NLL with per-user candidates: the user's own items plus the shared negatives.

    log_pos (N,) = log A_ui of each user's own items (inclusion probability 1); log_neg (B, S) over
    the negatives' sorted, distinct item ids `negatives` (S,), with log inclusion probabilities log_pi_neg (S,). A
    negative the user holds is already among its own items and is dropped, so
    Z_u ≈ Σ_{i∈x_u} A_ui + Σ_{j∈N∖x_u} A_uj / π_j, again unbiased (docs/sampled_softmax.md).
    """
    B, S = len(offsets) - 1, len(negatives)
    rows = bag_rows(offsets, len(indices))  # (N,)
    log_pos, log_neg = log_pos.float(), log_neg.float()
    # held[b, s]: user b holds negative s. `negatives` is sorted, so each own item is looked up in O(log S);
    # the mask is built by a scatter, with no boolean indexing (which would sync with the host on CUDA).
    at = torch.searchsorted(negatives, indices).clamp_max(max(S - 1, 0))  # (N,)
    hit = negatives[at] == indices if S else torch.zeros_like(indices, dtype=torch.bool)  # (N,)
    held = log_neg.new_zeros(B * S).index_add_(0, rows * S + at, hit.to(log_neg.dtype)).view(B, S) > 0
    corrected = (log_neg - log_pi_neg).masked_fill(held, -torch.inf)
    log_z_neg = torch.logsumexp(corrected, dim=1)  # (B,)
    top = log_pos.new_full((B,), -torch.inf).scatter_reduce(0, rows, log_pos.detach(), "amax")  # (B,) stability
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    log_z_own = log_pos.new_zeros(B).index_add(0, rows, torch.exp(log_pos - top[rows])).log() + top  # (B,)
    log_z = torch.logaddexp(log_z_own, log_z_neg)
    return -(log_pos.sum() - (log_z * offsets.diff()).sum()) / B


def elbo_loss(nll: torch.Tensor, kl: torch.Tensor, offsets: torch.Tensor, beta: float, kl_by_items: bool = False
              ) -> tuple[torch.Tensor, dict]:
    """Negative Eq. 5 per user: the reconstruction NLL (a scalar, from the softmax mode's own NLL:
    multinomial_nll or own_items_nll) + beta * the KL of the B users (B,). Returns (loss, detached nll and kl).

    kl_by_items (optim.kl_by_items, RecVAE's beta' = gamma * |x_u|): user u's KL is weighted by
    |x_u| / mean |x_u| over the batch. Without it a heavy user's reconstruction term, a sum over more
    items, outweighs its KL and it is regularised less than a light user; with it the two terms keep
    the same ratio for every user. The batch's mean weight stays beta.
    """
    mean_kl = kl.float().mean()
    if kl_by_items:
        n = offsets.diff().to(mean_kl.dtype)  # (B,) |x_u|
        penalty = (kl.float() * n).sum() / n.sum()  # = mean_u KL_u * |x_u| / mean |x_u|
    else:
        penalty = mean_kl
    # parts stay tensors on the device: reading them back (.item()) every step would sync with the host
    return nll + beta * penalty, {"nll": nll.detach(), "kl": mean_kl.detach()}
