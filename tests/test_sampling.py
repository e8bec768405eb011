"""Sampled softmax: exact with all items as candidates, negatives follow the proposal, training works."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from macrid.model.loss import multinomial_nll
from macrid.model.vae import MacridVAE
from macrid.model.sampling import NegativeSampler, all_items


def test_all_items_as_candidates_equals_full_softmax_with_gradients():
    torch.manual_seed(0)
    idx, off = torch.tensor([0, 3, 5, 1, 2, 7, 8]), torch.tensor([0, 3, 4, 7])
    losses, grads = [], []
    for use_candidates in (False, True):
        torch.manual_seed(1)
        model = MacridVAE(n_items=10, K=3, D=4, dropout=0.0, gumbel=False, sample=False).train()
        if use_candidates:
            cand = all_items(10)
            out = model.score_candidates(idx, off, cand.items)
            loss = multinomial_nll(out.log_scores, cand.positions(idx), off, cand.log_pi)
        else:
            loss = multinomial_nll(model.score_all(idx, off).log_scores, idx, off)
        loss.backward()
        losses.append(loss)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert_close(losses[0], losses[1])
    for a, b in zip(*grads):
        assert_close(a, b)


def test_candidates_hold_the_batch_items_and_zero_correction_for_them():
    sampler = NegativeSampler(np.arange(50), n_samples=10, alpha=1.0, seed=0)
    batch = torch.tensor([3, 7, 7, 42])
    cand = sampler.candidates(batch)
    assert torch.isin(batch, cand.items).all() and torch.equal(cand.items, cand.items.sort().values)
    assert (cand.log_pi[cand.positions(batch)] == 0).all()
    assert (cand.log_pi <= 0).all()


@pytest.mark.parametrize("alpha", [0.0, 0.75])
def test_negatives_follow_the_proposal(alpha):
    """Pearson chi-square of 200,000 draws against Q; threshold at p = 0.001 (Wilson-Hilferty)."""
    counts = np.random.default_rng(0).zipf(1.5, size=40).clip(max=1000)
    sampler = NegativeSampler(counts, n_samples=200_000, alpha=alpha, seed=123)
    observed = np.bincount(sampler.sample().numpy(), minlength=40)
    expected = sampler.q.numpy() * 200_000
    chi2 = ((observed - expected) ** 2 / expected).sum()
    df, z = 39, 3.09
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < critical, (chi2, critical)
    if alpha > 0:  # and the popular items really are favoured
        assert observed[np.argmax(counts)] > observed[np.argmin(counts)]


def test_row_sparse_tables_give_the_dense_gradients_and_touch_only_their_rows():
    idx, off = torch.tensor([0, 3, 5, 1, 2, 7, 8]), torch.tensor([0, 3, 4, 7])
    sampler = NegativeSampler(np.ones(40), n_samples=6, alpha=0.0, seed=3)
    cand = sampler.candidates(idx)
    grads = []
    for row_sparse in (False, True):
        torch.manual_seed(1)
        model = MacridVAE(n_items=40, K=3, D=4, dropout=0.0, gumbel=False, sample=False, row_sparse=row_sparse)
        loss = multinomial_nll(model.score_candidates(idx, off, cand.items).log_scores, cand.positions(idx), off, cand.log_pi)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    dense, sparse = grads
    for name in ("h", "t"):
        assert sparse[name].is_sparse and not dense[name].is_sparse
        assert_close(sparse[name].to_dense(), dense[name], msg=f"gradient of {name}")
    assert set(sparse["h"].coalesce().indices()[0].tolist()) == set(cand.items.tolist())
    assert set(sparse["t"].coalesce().indices()[0].tolist()) == set(idx.tolist())
    # Lazy Adam moves only the touched rows of h.
    before = model.h.detach().clone()
    torch.optim.SparseAdam([model.h], lr=0.1).step()
    moved = (model.h.detach() != before).any(1).nonzero().flatten()
    assert set(moved.tolist()) == set(cand.items.tolist())


def test_per_user_candidates_with_all_items_equal_full_softmax_with_gradients():
    """optim.candidates = "user": own items + every item as a negative (pi = 1) is the full softmax."""
    from macrid.model.loss import elbo_loss, multinomial_nll, own_items_nll

    idx, off = torch.tensor([0, 3, 5, 1, 2, 7, 8]), torch.tensor([0, 3, 4, 7])
    losses, grads = [], []
    for per_user in (False, True):
        torch.manual_seed(1)
        model = MacridVAE(n_items=10, K=3, D=4, dropout=0.0, gumbel=False, sample=False, row_sparse=per_user)
        if per_user:
            cand = all_items(10)
            out = model.score_own_and_negatives(idx, off, cand.items, cand.negatives)
            nll = own_items_nll(out.log_pos, out.log_neg, cand.items[cand.negatives], cand.log_pi_negatives, idx, off)
            loss, _ = elbo_loss(nll, out.kl, off, 0.0)
        else:
            out = model.score_all(idx, off)
            loss, _ = elbo_loss(multinomial_nll(out.log_scores, idx, off), out.kl, off, 0.0)
        loss.backward()
        losses.append(loss)
        grads.append({n: p.grad.to_dense() for n, p in model.named_parameters()})
    assert_close(losses[0], losses[1])
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], msg=f"gradient of {name}")


def test_per_user_estimate_of_the_normaliser_is_unbiased():
    """E[Ẑ_u] = Z_u over many draws of the negatives (Horvitz-Thompson with the user's own items kept)."""
    from macrid.model.loss import own_items_nll

    torch.manual_seed(0)
    M, S = 30, 8
    log_a = torch.randn(1, M)  # one user's log A over all items
    own = torch.tensor([2, 5])
    z_true = log_a.exp().sum()
    sampler = NegativeSampler(np.arange(M) % 7, n_samples=S, alpha=1.0, seed=0)
    off = torch.tensor([0, 2])
    estimates = []
    for _ in range(20000):
        cand = sampler.candidates(own)
        neg = cand.items[cand.negatives]
        nll = own_items_nll(log_a[0, own], log_a[:, neg], neg, cand.log_pi_negatives, own, off)
        log_z = (nll + log_a[0, own].sum()) / 2  # nll = -(Σ log A_own - 2 log Ẑ)
        estimates.append(log_z.exp())
    est = torch.stack(estimates)
    assert abs(est.mean() - z_true) < 4 * est.std() / math.sqrt(len(est)), (est.mean(), z_true)
