"""Metrics against hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from macrid.data.batches import CSR, HeldOut
from macrid.training.evaluate import evaluate, scores_ranker
from macrid.training.metrics import independence, ndcg_at_k, recall_at_k, targets_mask, top_k


def csr(rows):
    indptr = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
    return CSR(indptr, np.array([i for r in rows for i in r], dtype=np.int64))


def fixed_scorer(scores):
    scores = torch.tensor(scores, dtype=torch.float32)
    return scores_ranker(lambda idx, off: (scores[: len(off) - 1], None))


def test_ndcg_and_recall_hand_computed():
    # 6 items; user 0 folds in item 0 (highest score, must be excluded); targets {2, 4}.
    scores = [[9.0, 1.0, 8.0, 7.0, 6.0, 0.0]]
    split = HeldOut(np.array([0]), csr([[0]]), csr([[2, 4]]))
    m = evaluate(fixed_scorer(scores), split, n_items=6)
    # ranking without item 0: 2, 3, 4, 1, 5 -> hits at ranks 1 and 3
    dcg = 1 / math.log2(2) + 1 / math.log2(4)
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg@100"][0] == pytest.approx(dcg / idcg)
    assert m["recall@20"][0] == pytest.approx(1.0)  # 2 hits / min(20, 2)


def test_fewer_targets_than_k_and_normalisation():
    hits = torch.tensor([[True, False, False, True]])  # one user, k = 4 ranked items
    n_targets = torch.tensor([10])
    assert recall_at_k(hits, n_targets, 2).item() == pytest.approx(1 / 2)  # 1 hit / min(2, 10)
    assert recall_at_k(hits, torch.tensor([2]), 4).item() == pytest.approx(2 / 2)
    discount = [1 / math.log2(r + 2) for r in range(4)]
    # with 2 targets, IDCG covers only 2 positions even though k = 4
    assert ndcg_at_k(hits, torch.tensor([2]), 4).item() == pytest.approx(
        (discount[0] + discount[3]) / (discount[0] + discount[1]))


def test_ties_break_to_lower_item_index():
    scores = torch.tensor([[1.0, 5.0, 5.0, 5.0, 0.0]])
    assert top_k(scores, 2).tolist() == [[1, 2]]
    mask = targets_mask(top_k(scores, 2), torch.tensor([3]), torch.tensor([0, 1]), 5)
    assert mask.tolist() == [[False, False]]  # item 3 ties but loses to items 1 and 2


def test_users_without_targets_are_skipped_and_counted():
    scores = [[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]
    split = HeldOut(np.array([0, 1]), csr([[0], [1]]), csr([[1], []]))
    m = evaluate(fixed_scorer(scores), split, n_items=3)
    assert m["users"] == 1 and m["users_without_targets"] == 1
    assert m["ndcg@100"][0] == pytest.approx(1.0)


def test_standard_error_is_std_over_sqrt_n():
    scores = [[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]
    split = HeldOut(np.array([0, 1]), csr([[], []]), csr([[0], [2]]))
    m = evaluate(fixed_scorer(scores), split, n_items=3)
    per_user = np.array([1.0, 1 / math.log2(4)])
    assert m["ndcg@100"] == pytest.approx((per_user.mean(), per_user.std() / math.sqrt(2)))


def test_independence_score():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20000, 4))
    assert independence(x) == pytest.approx(1.0, abs=0.02)
    y = np.stack([x[:, 0], x[:, 0], -x[:, 0]], axis=1)  # perfectly (anti-)correlated
    assert independence(y) == pytest.approx(0.0, abs=1e-9)


def test_chunked_top_k_equals_full_ranking():
    from macrid.training.evaluate import chunked_top_k
    from macrid.model.vae import MacridVAE, MultVAE

    torch.manual_seed(0)
    idx, off = torch.tensor([0, 3, 5, 1, 2, 7, 8, 30]), torch.tensor([0, 3, 4, 8])
    for model in (MacridVAE(n_items=37, K=3, D=4).eval(), MultVAE(n_items=37, D=4, hidden=4).eval()):
        scores = model.score_all(idx, off).log_scores.clone()
        scores[torch.repeat_interleave(torch.arange(3), off.diff()), idx] = -torch.inf
        want = top_k(scores, 10)
        for chunk in (5, 16, 37, 100):
            assert torch.equal(chunked_top_k(model, idx, off, 37, 10, chunk=chunk)[0], want), chunk


def test_ease_matches_columnwise_ridge_regression():
    """EASE's closed form equals, column by column, ridge regression of item j on the other items."""
    from macrid.model.baselines import ease_weights, gram

    rows = [[0, 1, 2], [1, 2], [0, 3], [2, 3, 4], [0, 1, 4], [1, 3]]
    train = csr(rows)
    W = ease_weights(gram(train, 5), lam=0.7).double().numpy()
    X = np.zeros((len(rows), 5))
    for u, r in enumerate(rows):
        X[u, r] = 1.0
    for j in range(5):
        others = [i for i in range(5) if i != j]
        A = X[:, others]
        b = np.linalg.solve(A.T @ A + 0.7 * np.eye(4), A.T @ X[:, j])
        assert W[j, j] == 0.0
        np.testing.assert_allclose(W[others, j], b, rtol=1e-4, atol=1e-6)


def test_ease_that_would_not_fit_in_memory_is_refused_up_front():
    """Four M x M float64 matrices: at M = 1,000 that is 4 * 8 * 10^6 bytes (0.03 GiB). One byte less is refused,
    with the size in the message; exactly that much runs."""
    from macrid.errors import ConfigError
    from macrid.model.baselines import gram

    train = csr([[0, 1], [1, 2]])
    with pytest.raises(ConfigError, match=r"M=1,000 items needs about 0\.0 GiB.*machine with more memory"):
        gram(train, 1000, memory_bytes=4 * 8 * 1000 * 1000 - 1)
    assert gram(train, 1000, memory_bytes=4 * 8 * 1000 * 1000).shape == (1000, 1000)  # exactly enough: runs


def test_chunked_top_k_breaks_ties_like_the_full_sort():
    """Scores with heavy ties across chunk borders: still the lower item id first, as `top_k`."""
    from macrid.training.evaluate import chunked_top_k

    table = torch.randint(0, 4, (3, 50)).float()  # 3 users, 50 items, 4 distinct scores

    class Tied(torch.nn.Module):
        def represent(self, indices, offsets):
            return torch.zeros(len(offsets) - 1, 1, 1)

        def score(self, mu, items):
            return table[:, items]

    idx, off = torch.tensor([0, 7, 49]), torch.tensor([0, 1, 2, 3])
    full = table.clone()
    full[torch.arange(3), idx] = -torch.inf
    for chunk in (3, 7, 16, 50):
        assert torch.equal(chunked_top_k(Tied(), idx, off, 50, 20, chunk=chunk)[0], top_k(full, 20)), chunk


def test_nmi_ari_and_purity_on_a_hand_computed_case():
    from macrid.training.metrics import ari, nmi, purity

    truth, learned = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]
    # contingency rows (truth) x columns (learned): [[2, 1, 0], [0, 1, 2]]
    # ARI: sum C(n_ij, 2) = 2; rows C(3,2)*2 = 6; cols C(2,2)*3 = 3; C(6,2) = 15
    # expected = 6 * 3 / 15 = 1.2; max = (6 + 3) / 2 = 4.5; ARI = (2 - 1.2) / (4.5 - 1.2)
    assert ari(truth, learned) == pytest.approx(0.8 / 3.3)
    # NMI: MI = (2/3) ln 2, H(truth) = ln 2, H(learned) = ln 3, arithmetic-mean normalisation
    assert nmi(truth, learned) == pytest.approx((2 / 3) * np.log(2) / ((np.log(2) + np.log(3)) / 2))
    # purity: clusters' majority counts 2 + 1 + 2 out of 6
    assert purity(learned, truth) == pytest.approx(5 / 6)


def test_identical_labelings_score_one_whatever_the_names():
    from macrid.training.metrics import ari, nmi, purity

    a = np.array([0, 0, 1, 1, 2, 2, 2])
    renamed = np.array([7, 7, 3, 3, 5, 5, 5])
    assert nmi(a, renamed) == pytest.approx(1.0)
    assert ari(a, renamed) == pytest.approx(1.0)
    assert purity(renamed, a) == pytest.approx(1.0)


def test_genre_alignment_uses_the_first_genre_and_forgives_any_listed_genre():
    from macrid.output.alignment import genre_alignment

    genres = [["a"], ["a", "b"], ["b", "a"], ["b"], None, ["c"]]
    concept = np.array([0, 0, 0, 1, 1, 1])
    got = genre_alignment(concept, genres)
    # without the genre-less item: first genres a a b b c, concepts 0 0 0 1 1; concept 0's majority is a, 1's is b
    # (tie b/c broken by first occurrence); purity (2 + 1) / 5; any-genre: items 0 1 2 match a, item 3 matches b
    assert got["items"] == 5 and got["genres"] == 3
    assert got["purity"] == pytest.approx(3 / 5)
    assert got["any_genre_purity"] == pytest.approx(4 / 5)


def test_concept_usage_entropy_by_hand():
    from macrid.output.alignment import usage

    got = usage(np.array([0, 0, 1, 1]), K=4)  # two of four concepts used equally: ln 2, ratio ln2 / ln4 = 1/2
    assert got["counts"] == [2, 2, 0, 0]
    assert got["entropy"] == pytest.approx(math.log(2)) and got["entropy_ratio"] == pytest.approx(0.5)
    assert usage(np.zeros(9, dtype=int), K=3)["entropy"] == 0.0 and usage(np.zeros(9, dtype=int), K=3)["largest_share"] == 1.0
