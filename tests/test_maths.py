"""The model's formulas against independent restatements, on fixed inputs.

Each expectation is written here from the paper's equations with numpy or plain arithmetic, never
with the function under test, so that changing a formula in macrid/ (dropping tau from Eq. 6, a
hard Gumbel sample, the sign of the log-Q correction, exp(+b/2) for sigma, no re-normalisation of
z) fails a test.
"""

import math

import numpy as np
import pytest
import torch

from macrid.model.loss import beta_at, multinomial_nll
from macrid.model.vae import MacridVAE, MultVAE

TAU = 0.25


def tiny_macrid(K=2, D=3, M=4, **kw) -> MacridVAE:
    torch.manual_seed(0)
    model = MacridVAE(M, K=K, D=D, tau=TAU, sigma0=0.1, dropout=0.0, **kw)
    with torch.no_grad():
        model.h.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])[:M, :D])
        model.m.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])[:K, :D])
    return model


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_cos(a, b):
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)) @ (b / np.linalg.norm(b, axis=-1, keepdims=True)).T


def test_eq6_concepts_are_a_softmax_of_cosines_over_tau():
    model = tiny_macrid().eval()
    h = np.array([[1, 0, 0], [0, 2, 0], [1, 1, 0], [0, 0, 3]], dtype=float)
    m = np.array([[1, 0, 0], [0, 1, 1]], dtype=float)
    want = np_softmax(np_cos(h, m) / TAU, axis=1)  # (M, K)
    np.testing.assert_allclose(model.concepts().detach().numpy(), want, rtol=1e-5)
    # item 0 = prototype 0 exactly: cos 1 and 0 -> c_00 = 1 / (1 + e^{-1/tau}), by hand
    assert model.concepts()[0, 0].item() == pytest.approx(1 / (1 + math.exp(-1 / TAU)), rel=1e-5)


def test_fig2e_inner_product_concepts_are_a_softmax_of_unnormalised_dot_products():
    model = tiny_macrid(similarity="inner").eval()
    h = np.array([[1, 0, 0], [0, 2, 0], [1, 1, 0], [0, 0, 3]], dtype=float)
    m = np.array([[1, 0, 0], [0, 1, 1]], dtype=float)
    np.testing.assert_allclose(model.concepts().detach().numpy(), np_softmax(h @ m.T / TAU, axis=1), rtol=1e-5)
    # item 3 = (0, 0, 3): dots 0 and 3 -> c_31 = 1 / (1 + e^{-3/tau}); under cosine it would be 1 / (1 + e^{-0.707/tau})
    assert model.concepts()[3, 1].item() == pytest.approx(1 / (1 + math.exp(-3 / TAU)), rel=1e-5)


def test_training_concepts_are_relaxed_gumbel_samples_at_temperature_one():
    """log y_0 - log y_1 = (l_0 + g_0 - l_1 - g_1) / lambda with g ~ Gumbel(0, 1): mean (l_0 - l_1) / lambda and
    variance pi^2 / (3 lambda^2) (the difference of two Gumbels is logistic). lambda = 1 in the paper."""
    model = tiny_macrid().train()
    logits = np_cos(np.array([[1.0, 0, 0], [0, 2, 0], [1, 1, 0], [0, 0, 3]]),
                    np.array([[1.0, 0, 0], [0, 1, 1]])) / TAU  # (M, K)
    torch.manual_seed(1)
    draws = torch.stack([model.concepts().detach() for _ in range(4000)]).numpy()  # (n, M, K)
    assert (draws > 0).all() and (draws < 1).all(), "the sample must be relaxed, not one-hot"
    log_ratio = np.log(draws[:, :, 0]) - np.log(draws[:, :, 1])  # (n, M)
    np.testing.assert_allclose(log_ratio.mean(0), logits[:, 0] - logits[:, 1], atol=0.15)
    np.testing.assert_allclose(log_ratio.var(0), np.pi**2 / 3, rtol=0.1)


def test_eq7_encoder_against_a_restatement():
    """mu_u^k = a/|a|, (a, b) = f_nn(tanh(sum_i x_ui c_ik t_i / sqrt(sum_i x_ui c_ik^2) + t_bias))."""
    model = tiny_macrid().eval()
    torch.manual_seed(2)
    with torch.no_grad():
        model.t.normal_()
        model.t_bias.normal_()
    idx, off = torch.tensor([0, 2, 1, 2, 3]), torch.tensor([0, 2, 5])  # user 0: {0, 2}; user 1: {1, 2, 3}
    c = model.concepts().detach().numpy()
    t, tb = model.t.detach().numpy(), model.t_bias.detach().numpy()
    W, bias = model.f_nn.weight.detach().numpy(), model.f_nn.bias.detach().numpy()
    mu_want, lnvar_want = [], []
    for items in ([0, 2], [1, 2, 3]):
        per_k_mu, per_k_lnvar = [], []
        for k in range(2):
            w = c[items, k] / np.sqrt((c[items, k] ** 2).sum())
            a_b = W @ np.tanh(w @ t[items] + tb) + bias
            a, b = a_b[:3], a_b[3:]
            per_k_mu.append(a / np.linalg.norm(a))
            per_k_lnvar.append(-b)  # sigma = sigma0 * exp(-b / 2), so ln(sigma^2 / sigma0^2) = -b
        mu_want.append(per_k_mu)
        lnvar_want.append(per_k_lnvar)
    mu, lnvar = model.encode(idx, off, model.concepts()[idx])
    np.testing.assert_allclose(mu.detach().numpy(), np.array(mu_want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lnvar.detach().numpy(), np.array(lnvar_want), rtol=1e-5, atol=1e-6)


def test_decoder_is_a_concept_mixture_of_cosines_over_tau():
    """log p(i|u) up to a constant = log sum_k c_ik exp(cos(z_u^k, h_i) / tau), z = mu in evaluation."""
    model = tiny_macrid().eval()
    idx, off = torch.tensor([0, 3]), torch.tensor([0, 2])
    out = model.score_all(idx, off)
    mu = out.mu.detach().numpy()[0]  # (K, D)
    h = model.h.detach().numpy()
    c = model.concepts().detach().numpy()  # (M, K), checked against Eq. 6 above
    want = np.log((c * np.exp(np_cos(h, mu) / TAU)).sum(1))  # (M,)
    np.testing.assert_allclose(out.log_scores.detach().numpy()[0], want, rtol=1e-5)


def fixed_code_model(b_value: float, D: int = 2) -> MacridVAE:
    """K = 1, D = 2, items h_0 = e_0 and h_1 = e_1; f_nn ignores its input: a = (1, 0), b = b_value."""
    model = MacridVAE(2, K=1, D=D, tau=TAU, sigma0=0.1, dropout=0.0, gumbel=False)
    with torch.no_grad():
        model.h.copy_(torch.eye(2))
        model.f_nn.weight.zero_()
        model.f_nn.bias.copy_(torch.tensor([1.0, 0.0, b_value, b_value]))
    return model.train()


def test_sampled_z_has_sigma0_exp_minus_b_over_2_and_is_renormalised():
    """With K = 1 the score of item i is cos(z, h_i) / tau, so the scores give z's direction back."""
    b = 2.0
    sigma = 0.1 * math.exp(-b / 2)  # Eq. 7: sigma = sigma0 * exp(-b / 2)
    model = fixed_code_model(b)
    n = 20000
    idx, off = torch.zeros(n, dtype=torch.long), torch.arange(n + 1)
    torch.manual_seed(3)
    s = model.score_all(idx, off).log_scores.detach().numpy() * TAU  # (n, 2) = cos(z, e_0), cos(z, e_1)
    np.testing.assert_allclose(s[:, 0] ** 2 + s[:, 1] ** 2, 1.0, rtol=1e-5)  # z is unit-norm before decoding
    # z = (1 + sigma e1, sigma e2): its angle atan2(sigma e2, 1 + sigma e1), simulated here with numpy
    e = np.random.default_rng(0).standard_normal((200000, 2))
    want_std = np.arctan2(sigma * e[:, 1], 1 + sigma * e[:, 0]).std()
    got_std = np.arctan2(s[:, 1], s[:, 0]).std()
    assert got_std == pytest.approx(want_std, rel=0.05), (got_std, want_std)


def test_kl_against_n0_sigma0_per_component():
    """The authors' KL: 1/2 sum_d (-ln v + v - 1), v = sigma^2 / sigma0^2 = exp(-b), here D = 2, K = 1, b = 2."""
    model = fixed_code_model(2.0).eval()
    kl = model.score_all(torch.tensor([0]), torch.tensor([0, 1])).kl.item()
    v = math.exp(-2.0)
    assert kl == pytest.approx(2 * 0.5 * (-math.log(v) + v - 1), rel=1e-6)


def test_log_q_correction_divides_each_candidate_by_its_inclusion_probability():
    """-log softmax with Z = sum_j exp(s_j) / pi_j: the user holds item 0, the candidates have pi = 1, 1/2, 1/4."""
    s = [1.0, 2.0, 0.5]
    pi = [1.0, 0.5, 0.25]
    want = -(s[0] - math.log(sum(math.exp(x) / p for x, p in zip(s, pi))))
    got = multinomial_nll(torch.tensor([s]), torch.tensor([0]), torch.tensor([0, 1]),
                          torch.log(torch.tensor(pi))).item()
    assert got == pytest.approx(want, rel=1e-6)
    full = -(s[0] - math.log(sum(math.exp(x) for x in s)))  # no correction = full softmax on these items
    assert multinomial_nll(torch.tensor([s]), torch.tensor([0]), torch.tensor([0, 1])).item() == pytest.approx(full)


@pytest.mark.parametrize("step,want", [(0, 0.0), (25, 0.1), (50, 0.2), (500, 0.2)])
def test_beta_rises_linearly_to_its_cap(step, want):
    # cap 0.2 over 5 epochs of 10 steps: 0.2 * step / 50, then the cap
    assert beta_at(step, 10, 0.2, 5.0) == pytest.approx(want)


@pytest.mark.parametrize("cap,step,want", [(0.2, 0, 0.0), (0.2, 5, 0.1), (0.2, 10, 0.2), (0.2, 30, 0.2),
                                           (1.0, 25, 0.5), (1.0, 49, 0.98), (1.0, 50, 1.0), (1.0, 80, 1.0)])
def test_the_authors_beta_schedule_reaches_the_cap_after_five_beta_epochs(cap, step, want):
    # 10 steps per epoch: beta grows by 1/5 per epoch = 1/50 per step, whatever anneal_epochs says, so
    # cap 0.2 arrives after 5 * 0.2 = 1 epoch (step 10) and cap 1.0 after 5 epochs (step 50)
    assert beta_at(step, 10, cap, 99.0, "authors") == pytest.approx(want)


def test_beta_without_annealing_is_the_cap():
    assert beta_at(0, 10, 0.3, 0.0) == 0.3


def tiny_mult(variational: bool) -> MultVAE:
    torch.manual_seed(4)
    model = MultVAE(4, D=2, hidden=3, dropout=0.0, variational=variational)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.eval()


@pytest.mark.parametrize("variational", [True, False])
def test_mult_encoder_decoder_and_kl_against_a_restatement(variational):
    """x_u / |x_u| -> tanh(x T + b) -> f_nn -> (mu, logvar) or tanh(code); scores z H^T + h_bias;
    KL = 1/2 sum(-logvar + e^logvar + mu^2 - 1) for beta-MultVAE, 0 for MultDAE."""
    model = tiny_mult(variational)
    idx, off = torch.tensor([1, 3]), torch.tensor([0, 2])
    out = model.score_all(idx, off)
    P = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    x = np.zeros(4)
    x[[1, 3]] = 1 / math.sqrt(2)
    code = P["f_nn.weight"] @ np.tanh(x @ P["t"] + P["t_bias"]) + P["f_nn.bias"]
    if variational:
        mu, logvar = code[:2], code[2:]
        kl = 0.5 * (-logvar + np.exp(logvar) + mu**2 - 1).sum()
    else:
        mu, kl = np.tanh(code), 0.0
    np.testing.assert_allclose(out.mu.detach().numpy()[0, 0], mu, rtol=1e-5)
    assert out.kl.item() == pytest.approx(kl, rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(out.log_scores.detach().numpy()[0], P["h"] @ mu + P["h_bias"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step,factor", [(0, 1.0), (25, (1 + math.cos(math.pi / 4)) / 2), (50, 0.5), (100, 0.0),
                                         (130, 0.0)])
def test_cosine_learning_rate_by_hand(step, factor):
    from macrid.model.loss import lr_at

    assert lr_at(step, 100, 0.002, "cosine") == pytest.approx(0.002 * factor, abs=1e-12)
    assert lr_at(step, 100, 0.002) == 0.002  # constant


def test_composite_prior_kl_against_a_restatement():
    """RecVAE's prior per dimension: 3/20 N(0, s0^2) + 3/4 N(mu_old, s0^2 e^lnvar_old) + 1/10 N(0, e^10); the KL is
    log q(z|x) - log p(z) at the sample, summed over K and D. q_old is the encoder frozen by freeze_old_posterior."""
    model = tiny_macrid(prior="composite").train()
    idx, off = torch.tensor([0, 2, 1, 2, 3]), torch.tensor([0, 2, 5])
    model.eval()
    with torch.no_grad():
        mu_before, lnvar_before = model.encode(idx, off, model.concepts(model.h[idx]))
    model.freeze_old_posterior()
    with torch.no_grad():
        model.t.add_(0.3)  # the live encoder moves on; q_old must not
    model.train()
    torch.manual_seed(3)
    mu, lnvar = model.encode(idx, off, model.concepts(model.h[idx]))
    z = mu + 0.05 * torch.randn_like(mu)
    got = model._composite_kl(idx, off, z, mu, lnvar).detach().numpy()

    def npdf(x, m, v):
        return np.exp(-0.5 * (x - m) ** 2 / v) / np.sqrt(2 * np.pi * v)

    s0 = model.sigma0 ** 2
    Z, M, LV = z.detach().numpy(), mu.detach().numpy(), lnvar.detach().numpy()
    MO, LVO = mu_before.numpy(), lnvar_before.numpy()
    prior = 3 / 20 * npdf(Z, 0, s0) + 3 / 4 * npdf(Z, MO, s0 * np.exp(LVO)) + 1 / 10 * npdf(Z, 0, np.exp(10.0))
    want = (np.log(npdf(Z, M, s0 * np.exp(LV))) - np.log(prior)).sum(axis=(1, 2))
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_kl_weighted_by_item_count_against_a_restatement():
    """optim.kl_by_items (RecVAE's beta * |x_u|): loss = nll + beta * sum_u KL_u |x_u| / sum_u |x_u|."""
    from macrid.model.loss import elbo_loss, multinomial_nll

    idx, off = torch.tensor([0, 1, 2, 3, 1, 2]), torch.tensor([0, 1, 4, 6])  # |x_u| = 1, 3, 2
    log_scores = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]]))
    kl = torch.tensor([2.0, 0.5, 1.0])
    nll = -(math.log(0.1) + math.log(0.25) * 3 + math.log(0.3) + math.log(0.2)) / 3
    assert multinomial_nll(log_scores, idx, off).item() == pytest.approx(nll, rel=1e-6)
    by_items, _ = elbo_loss(multinomial_nll(log_scores, idx, off), kl, off, 0.3, kl_by_items=True)
    plain, _ = elbo_loss(multinomial_nll(log_scores, idx, off), kl, off, 0.3)
    assert by_items.item() == pytest.approx(nll + 0.3 * (2.0 * 1 + 0.5 * 3 + 1.0 * 2) / 6, rel=1e-6)
    assert plain.item() == pytest.approx(nll + 0.3 * (2.0 + 0.5 + 1.0) / 3, rel=1e-6)


def test_deeper_encoder_adds_residual_tanh_layers_before_f_nn():
    """model.encoder_layers = 2: g_0 = tanh(pooled + t_bias), g_{l+1} = g_l + tanh(W_l g_l + b_l), (a, b) = f_nn(g_2)."""
    model = tiny_macrid(encoder_layers=2).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        model.t.normal_()
        for layer in model.deep:
            layer.weight.normal_()
            layer.bias.normal_()
    idx, off = torch.tensor([1, 2, 3]), torch.tensor([0, 3])  # one user with items {1, 2, 3}
    c = model.concepts().detach().numpy()
    t = model.t.detach().numpy()
    layers = [(layer.weight.detach().numpy(), layer.bias.detach().numpy()) for layer in model.deep]
    W, bias = model.f_nn.weight.detach().numpy(), model.f_nn.bias.detach().numpy()
    want = []
    for k in range(2):
        w = c[[1, 2, 3], k] / np.sqrt((c[[1, 2, 3], k] ** 2).sum())
        g = np.tanh(w @ t[[1, 2, 3]])  # t_bias is 0 at initialisation
        for Wl, bl in layers:
            g = g + np.tanh(Wl @ g + bl)
        a = (W @ g + bias)[:3]
        want.append(a / np.linalg.norm(a))
    mu, _ = model.encode(idx, off, model.concepts()[idx])
    np.testing.assert_allclose(mu[0].detach().numpy(), np.array(want), rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in model.deep.parameters()) == 2 * (3 * 3 + 3)  # 2 * (D^2 + D)


def test_item_bias_is_added_to_log_p_on_every_scoring_path():
    """model.item_bias: log p(i|u) up to a constant = log sum_k c_ik exp(cos(z_u^k, h_i) / tau) + b_i, on the full
    softmax, the sampled path (negatives and the user's own items) and the chunked ranking of `score`."""
    model = tiny_macrid(item_bias=True).eval()
    b = np.array([0.5, -1.0, 2.0, 0.0])
    with torch.no_grad():
        model.item_bias.copy_(torch.tensor(b))
    idx, off = torch.tensor([0, 3]), torch.tensor([0, 2])
    out = model.score_all(idx, off)
    mu = out.mu.detach().numpy()[0]  # (K, D)
    c = model.concepts().detach().numpy()
    want = np.log((c * np.exp(np_cos(model.h.detach().numpy(), mu) / TAU)).sum(1)) + b  # (M,)
    np.testing.assert_allclose(out.log_scores.detach().numpy()[0], want, rtol=1e-5)
    # candidates 0, 2, 3 (item 1 left out, so positions differ from item ids); the negative is position 1 = item 2
    sampled = model.score_own_and_negatives(idx, off, torch.tensor([0, 2, 3]), torch.tensor([1]))
    np.testing.assert_allclose(sampled.log_neg.detach().numpy()[0], want[[2]], rtol=1e-5)
    np.testing.assert_allclose(sampled.log_pos.detach().numpy(), want[[0, 3]], rtol=1e-5)
    np.testing.assert_allclose(model.score(out.mu, torch.tensor([3, 1])).numpy()[0], want[[3, 1]], rtol=1e-5)
