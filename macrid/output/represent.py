"""What a trained MacridVAE says about users and items, in evaluation mode: the export's numbers.

- users: the K components mu^(k) (Eq. 7, z = mu), each with the user's share of concept k
  (sum of c_ik over the user's items, normalised over k), and optionally the top-N items with
  their log-score log A_ui and the concept each comes from (the k with the largest term
  c_ik * exp(cos(mu_k, h_i) / tau) of A_ui = sum_k of those terms); with model.item_bias the
  log-score is log A_ui + b_i;
- items: c_i (Eq. 6, the softmax), its argmax (the item's concept) and h_i.

Plain torch on the model's device; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from macrid.data.bags import bag_rows, to_device
from macrid.training.evaluate import chunked_top_k
from macrid.model.vae import MacridVAE, item_concept


@dataclass
class Users:
    mu: torch.Tensor  # (B, K, D) unit-norm components
    share: torch.Tensor  # (B, K) the user's share of each concept, rows sum to 1
    top_items: torch.Tensor | None = None  # (B, N) item indices, best first, the user's own items excluded
    top_scores: torch.Tensor | None = None  # (B, N) log A_ui
    top_concepts: torch.Tensor | None = None  # (B, N) the concept each recommendation comes from
    # (B, N) False where the user has fewer than N items left to recommend (N + |u| > M): those slots hold
    # the user's own items, scored -inf in the ranking, and are not recommendations
    top_valid: torch.Tensor | None = None


@torch.no_grad()
def users(model: MacridVAE, indices: torch.Tensor, offsets: torch.Tensor, top_n: int = 0) -> Users:
    """A batch of users (CSR: indices (N,), offsets (B+1,)) -> their components, shares and top-N items."""
    model.eval()
    device = model.h.device
    indices, offsets = to_device(indices, device), to_device(offsets, device)
    B, n_items = len(offsets) - 1, model.h.shape[0]
    # c_i once per distinct item of the batch (far fewer than the N non-zeros), shared by share and encoder
    items, inverse = torch.unique(indices, return_inverse=True)  # (C,), (N,)
    c_x = model.concepts(model.h[items])[inverse]  # (N, K) c_i of each of the users' items
    share = c_x.new_zeros(B, model.K).index_add_(0, bag_rows(offsets, len(indices)), c_x)  # (B, K)
    share = share / share.sum(1, keepdim=True).clamp_min(1e-12)
    if top_n <= 0:
        return Users(model.encode(indices, offsets, c_x)[0], share)
    top, mu = chunked_top_k(model, indices, offsets, n_items, min(top_n, n_items))  # (B, N), (B, K, D)
    terms = concept_terms(model, mu, top)  # (B, N, K)
    scores = terms.sum(-1).log()  # (B, N)
    if model.item_bias is not None:
        scores = scores + model.item_bias[top]
    rows = bag_rows(offsets, len(indices))  # (N_nz,)
    own = torch.isin(torch.arange(B, device=device)[:, None] * n_items + top,  # (B, N) key of each slot
                     rows * n_items + indices)  # the users' own (user, item) keys
    return Users(mu, share, top, scores, item_concept(model.concepts(model.h[top].reshape(-1, model.D)))
                 .view(top.shape), ~own)  # each recommendation's concept: the item's (the mode of c_i)


@torch.no_grad()
def concept_terms(model: MacridVAE, mu: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """c_ik * exp(cos(mu_uk, h_i) / tau) for each user u's own list of items (B, N) -> (B, N, K)."""
    h = model.h[items]  # (B, N, D)
    c = model.concepts(h.reshape(-1, h.shape[-1])).view(*items.shape, model.K)  # (B, N, K)
    cos = torch.einsum("bkd,bnd->bnk", F.normalize(mu, dim=-1), F.normalize(h, dim=-1))  # (B, N, K)
    return c * torch.exp(cos / model.tau)


@torch.no_grad()
def items(model: MacridVAE, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Items lo..hi-1 -> (c_i (C, K), h_i (C, D), b_i (C,) the item bias, or None without model.item_bias)."""
    model.eval()
    h = model.h[lo:hi].detach()  # (C, D)
    bias = None if model.item_bias is None else model.item_bias[lo:hi].detach()
    return model.concepts(h), h, bias
