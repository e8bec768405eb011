"""Sec. 2.4: the traversal, its beam search against brute force, the range search, and steering."""

import itertools

import numpy as np
import pytest
import torch

from macrid.output.traverse import SteerItems, beam_search, dimension_range, steer, traverse


def planted(seed=0, M=300, D=6, K=3):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((K, D))
    h = m[rng.integers(0, K, M)] + 0.6 * rng.standard_normal((M, D))  # items around their prototype
    return h, m


def nearest(v, m):
    return int(np.argmax((m / np.linalg.norm(m, axis=1, keepdims=True)) @ (v / np.linalg.norm(v))))


def test_the_range_is_where_the_nearest_prototype_stays():
    m = np.array([[1.0, 0.0], [0.0, 1.0]])
    # from (1, 0.2), moving y: cos to (1,0) is 1/sqrt(1+y^2), to (0,1) is y/sqrt(1+y^2): k=0 while y < 1;
    # downwards k=0 stays (the second cosine turns negative), so a is the search bound
    a, b = dimension_range(np.array([1.0, 0.2]), 1, m, span=5.0)
    assert b == pytest.approx(1.0, abs=1e-9)
    assert a == pytest.approx(0.2 - 5.0)


def test_the_traversal_returns_b_items_of_the_starting_concept_rising_in_dimension_j():
    h, m = planted()
    start, j, B = 0, 2, 6
    t = traverse(h[start], j, h, m, tau=0.5, n_steps=B, gamma=0.1, width=8, exclude=start)
    assert len(t.items) == B and start not in t.items
    assert all(nearest(h[i], m) == nearest(h[start], m) == t.concept for i in t.items)
    values = [h[i, j] for i in t.items]
    assert all(x < y for x, y in zip(values, values[1:]))  # strictly rising along the trajectory
    for i, lo, hi in zip(t.items, t.edges[:-1], t.edges[1:]):
        assert lo < h[i, j] <= hi  # one item from each subrange, in order
    # the subranges hold equal numbers (+-1) of the concept's items inside (a, b)
    members = [i for i in range(len(h)) if nearest(h[i], m) == t.concept and i != start]
    counts = [sum(lo < h[i, j] <= hi for i in members) for lo, hi in zip(t.edges[:-1], t.edges[1:])]
    assert max(counts) - min(counts) <= 1


def objective(items, h, h_star, j, tau, gamma):
    """Sec. 2.4's objective, restated."""
    def cos(u, v):
        u, v = np.delete(u, j), np.delete(v, j)
        return u @ v / np.linalg.norm(u) / np.linalg.norm(v)
    first = sum(np.exp(cos(h[i], h_star) / tau) for i in items)
    pairs = sum(np.exp(cos(h[a], h[b]) / tau) for a, b in itertools.combinations(items, 2))
    return first + gamma * pairs


@pytest.mark.parametrize("gamma", [0.0, 0.5, 3.0])
def test_beam_search_finds_the_brute_force_optimum_on_a_tiny_instance(gamma):
    rng = np.random.default_rng(1)
    h = rng.standard_normal((9, 4))
    h_star, j, tau = rng.standard_normal(4), 1, 0.5
    groups = [np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([6, 7, 8])]
    items, value = beam_search(groups, h, h_star, j, tau, gamma, width=27)  # 27 = every sequence: exact
    best = max(itertools.product(*groups), key=lambda s: objective(s, h, h_star, j, tau, gamma))
    assert tuple(items) == best
    assert value == pytest.approx(objective(best, h, h_star, j, tau, gamma))
    greedy, greedy_value = beam_search(groups, h, h_star, j, tau, gamma, width=1)
    assert greedy_value <= value + 1e-9 and greedy_value == pytest.approx(objective(greedy, h, h_star, j, tau, gamma))


def test_steering_a_concept_weight_to_zero_removes_its_items_and_ranks_by_the_restated_score():
    """Issue 31: an item's concept is the mode of c_i; weight w_k multiplies the A_ui of concept k's items, so 0
    removes every one of them, whatever share of its probability the other concepts hold."""
    from macrid.model.vae import MacridVAE

    torch.manual_seed(0)
    model = MacridVAE(50, K=3, D=8).eval()
    mu = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    own = torch.tensor([0, 1, 2])
    weights = torch.tensor([1.0, 0.0, 2.0])
    items, scores, concepts = steer(SteerItems.of(model.h.detach(), model.concepts().detach()), model.tau, mu, own, 60,
                                     weights)
    h = model.h.detach()
    hn, mn = h / h.norm(dim=1, keepdim=True), model.m.detach() / model.m.detach().norm(dim=1, keepdim=True)
    c = torch.softmax(hn @ mn.T / model.tau, dim=1)
    mode = c.argmax(1)  # restated: each item's concept
    A = (c * torch.exp(hn @ mu.T / model.tau)).sum(1) * weights[mode]  # restated: w_{k(i)} sum_k c_ik exp(cos/tau)
    A[own] = 0.0
    kept = int((A > 0).sum())
    assert 0 < kept < 47 and len(items) == kept  # asked for 60: every item of concept 1 is gone, not filled in
    assert items.tolist() == torch.argsort(A, descending=True)[:kept].tolist()
    assert torch.allclose(scores, A[items].log(), atol=1e-5)
    assert concepts.tolist() == mode[items].tolist() and 1 not in concepts.tolist()
    assert (mode == 1).sum() > 0 and not set(torch.nonzero(mode == 1).flatten().tolist()) & set(items.tolist())


def test_steering_adds_the_item_bias_to_the_restated_score():
    """model.item_bias: the score is log sum_k c_ik exp(cos(mu_k, h_i) / tau) + b_i, so a large b_i lifts item i."""
    torch.manual_seed(1)
    h, mu = torch.randn(30, 6), torch.nn.functional.normalize(torch.randn(2, 6), dim=1)
    c = torch.softmax(torch.randn(30, 2), dim=1)
    bias = torch.randn(30)
    bias[7] = 50.0  # far above any log A_ui (cos / tau <= 10)
    items, scores, _ = steer(SteerItems.of(h, c, bias), 0.1, mu, torch.tensor([0]), 5)
    hn = h / h.norm(dim=1, keepdim=True)
    want = (c * torch.exp(hn @ mu.T / 0.1)).sum(1).log() + bias  # (30,)
    want[0] = -torch.inf
    assert items.tolist() == torch.argsort(want, descending=True)[:5].tolist() and items[0] == 7
    assert torch.allclose(scores, want[items], atol=1e-4)
