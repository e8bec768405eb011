"""Sampled softmax: exact with all items as candidates, negatives follow the proposal, training works."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from macrid.loss import multinomial_nll
from macrid.model import MacridVAE
from macrid.sampling import NegativeSampler, all_items


def test_all_items_as_candidates_equals_full_softmax_with_gradients():
    torch.manual_seed(0)
    idx, off = torch.tensor([0, 3, 5, 1, 2, 7, 8]), torch.tensor([0, 3, 4, 7])
    losses, grads = [], []
    for use_candidates in (False, True):
        torch.manual_seed(1)
        model = MacridVAE(n_items=10, K=3, D=4, dropout=0.0, gumbel=False, sample=False).train()
        if use_candidates:
            cand = all_items(10)
            out = model(idx, off, cand.items)
            loss = multinomial_nll(out.log_scores, cand.positions(idx), off, cand.log_pi)
        else:
            loss = multinomial_nll(model(idx, off).log_scores, idx, off)
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
