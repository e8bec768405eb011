"""Invariants of MacridVAE (Eq. 6, 7 and the decoder) on tiny tensors."""

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from macrid.model.mixture import mixture_scores, mixture_scores_reference
from macrid.model.vae import MacridVAE, MultVAE


def tiny_batch():
    indices = torch.tensor([0, 3, 5, 1, 2, 7, 8, 9, 4])  # (N,)
    offsets = torch.tensor([0, 3, 4, 9])  # (B+1,) three users
    return indices, offsets


def make(**kw):
    torch.manual_seed(0)
    return MacridVAE(n_items=10, K=3, D=4, **kw)


def test_concept_probabilities_sum_to_one():
    model = make().eval()
    c = model.concepts()  # (M, K)
    assert_close(c.sum(1), torch.ones(10))
    model.train()
    assert_close(model.concepts().sum(1), torch.ones(10))  # the Gumbel sample is on the simplex too


def test_concepts_invariant_to_rescaling_h_and_m():
    model = make().eval()
    before = model.concepts()
    with torch.no_grad():
        model.h[2] *= 7.5
        model.h[5] *= 0.01
        model.m[1] *= 123.0
    assert_close(model.concepts(), before)


def test_mu_has_unit_norm():
    model = make().eval()
    out = model.score_all(*tiny_batch())
    assert out.mu.shape == (3, 3, 4)
    assert_close(out.mu.norm(dim=-1), torch.ones(3, 3))


def test_kl_matches_closed_form():
    """KL(N(mu, sigma0^2 e^lnvar) || N(0, sigma0^2)) minus the mu^2/sigma0^2 term the authors drop."""
    model = make(sigma0=0.2).eval()
    idx, off = tiny_batch()
    out = model.score_all(idx, off)
    mu, lnvar = model.encode(idx, off, model.concepts()[idx])
    sigma = 0.2 * torch.exp(0.5 * lnvar)
    q = torch.distributions.Normal(mu, sigma)
    p = torch.distributions.Normal(torch.zeros_like(mu), 0.2 * torch.ones_like(mu))
    full = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2))
    mu_term = (mu.square() / (2 * 0.2**2)).sum(dim=(1, 2))
    assert_close(out.kl, full - mu_term)


def test_sparse_encoder_equals_dense_reference():
    model = make(dropout=0.0).eval()
    idx, off = tiny_batch()
    c = model.concepts()
    mu, lnvar = model.encode(idx, off, c[idx])
    x = torch.zeros(3, 10)
    x[torch.repeat_interleave(torch.arange(3), off.diff()), idx] = 1.0  # dense (B, M)
    xk = x.unsqueeze(1) * c.T.unsqueeze(0)  # (B, K, M), Eq. 7 numerator weights
    xk = F.normalize(xk, dim=-1)
    a, b = model.f_nn(torch.tanh(xk @ model.t + model.t_bias)).split(4, dim=-1)
    assert_close(mu, F.normalize(a, dim=-1))
    assert_close(lnvar, -b)


def test_evaluation_is_deterministic_and_training_is_not():
    model = make().eval()
    a, b = model.score_all(*tiny_batch()), model.score_all(*tiny_batch())
    assert torch.equal(a.log_scores, b.log_scores)
    model.train()
    assert not torch.equal(model.score_all(*tiny_batch()).log_scores, model.score_all(*tiny_batch()).log_scores)


def test_decoder_is_the_concept_mixture_of_cosines():
    """log_scores_ui = log sum_k c_ik exp(cos(mu_uk, h_i) / tau) in evaluation mode."""
    model = make().eval()
    out = model.score_all(*tiny_batch())
    c = model.concepts()
    cos = torch.einsum("bkd,md->bkm", F.normalize(out.mu, dim=-1), F.normalize(model.h, dim=1))
    expected = torch.log((torch.exp(cos / model.tau) * c.T.unsqueeze(0)).sum(1))
    assert_close(out.log_scores, expected)


def test_mixture_backward_matches_autograd():
    torch.manual_seed(1)
    zn = F.normalize(torch.randn(4, 3, 5, dtype=torch.float64), dim=-1).requires_grad_()
    hn = F.normalize(torch.randn(11, 5, dtype=torch.float64), dim=-1).requires_grad_()
    c = torch.softmax(torch.randn(11, 3, dtype=torch.float64), 1).requires_grad_()
    w = torch.randn(4, 11, dtype=torch.float64)
    grads = []
    for fn in (mixture_scores, mixture_scores_reference):
        out = fn(zn, hn, c, 0.1)
        grads.append((out, *torch.autograd.grad((out.log() * w).sum(), (zn, hn, c))))
    for got, want in zip(*grads):
        assert_close(got, want)


def test_multvae_and_multdae_shapes_and_budget():
    idx, off = tiny_batch()
    for variational in (True, False):
        model = MultVAE(n_items=1000, D=4, hidden=4, variational=variational).eval()
        out = model.score_all(idx, off)
        assert out.log_scores.shape == (3, 1000) and out.mu.shape == (3, 1, 4)
        n_params = sum(p.numel() for p in model.parameters())
        assert n_params < 2 * 1000 * 4 * 1.2  # about 2*M*D, the paper's budget


def test_concept_tau_sets_eq6_alone_and_the_decoder_keeps_tau():
    """model.concept_tau: c_i = softmax_k(cos(h_i, m_k) / tau_c) (Eq. 6 with its own temperature), while the
    decoder still scores log sum_k c_ik exp(cos(mu_k, h_i) / tau); 0 means tau (the paper). Restated in numpy."""
    import numpy as np

    from macrid.config import load_config
    from macrid.model.vae import build_model

    torch.manual_seed(0)
    cfg = load_config(None, ["model.K=3", "model.D=8", "model.tau=0.1", "model.concept_tau=0.3",
                             "model.prior='composite'"])
    model = build_model(cfg.model, 40).eval()
    h, m = model.h.detach().numpy(), model.m.detach().numpy()
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    for tau_c, mdl in ((0.3, model), (0.1, build_model(load_config(None, ["model.K=3", "model.D=8"]).model, 40).eval())):
        hh, mm = mdl.h.detach().numpy(), mdl.m.detach().numpy()
        logits = unit(hh) @ unit(mm).T / tau_c
        c = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(mdl.concepts().detach().numpy(), c / c.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)
    mu = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1)  # (B, K, D)
    items = torch.arange(40)
    logits = unit(h) @ unit(m).T / 0.3
    c = np.exp(logits - logits.max(1, keepdims=True))
    c /= c.sum(1, keepdims=True)
    cos = np.einsum("bkd,md->bmk", mu.numpy(), unit(h))  # (B, M, K)
    expected = np.log((c[None] * np.exp(cos / 0.1)).sum(-1))  # (B, M)
    np.testing.assert_allclose(model.score(mu, items).numpy(), expected, rtol=1e-4, atol=1e-4)
    model.freeze_old_posterior()  # the composite prior's frozen copy computes c_i the same way
    assert model._old[0].concept_tau == 0.3
