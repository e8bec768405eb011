"""The MultVAE protocol split: counts on real ml-1m, determinism, vocabulary rules."""

import polars as pl
import pytest

from conftest import real_data
from macrid.data.readers import read_raw
from macrid.data.split import Protocol, split_multvae


def toy_interactions(n_users=60, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = [(u, int(i), float(rng.integers(1, 6))) for u in range(n_users) for i in rng.choice(40, 15, replace=False)]
    return pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float64}, orient="row")


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    df = toy_interactions()
    a, b = split_multvae(df, Protocol(seed=1)), split_multvae(df, Protocol(seed=1))
    c = split_multvae(df, Protocol(seed=2))
    assert a.user_ids.equals(b.user_ids) and a.val.equals(b.val) and a.test.equals(b.test)
    assert not a.user_ids.equals(c.user_ids)


def test_split_rules_on_toy_data():
    df = toy_interactions()
    s = split_multvae(df, Protocol(min_rating=4, heldout=0.1))
    kept = df.filter(pl.col("rating") >= 4)
    assert s.n_heldout == int(0.1 * s.user_ids.len())
    train_items = set(s.train["items"].explode().to_list())
    assert train_items == set(range(s.item_ids.len()))  # vocabulary = items of training users
    for part in (s.val, s.test):
        for f, h in zip(part["foldin"].to_list(), part["heldout"].to_list()):
            assert not set(f) & set(h)
            assert len(h) == int(0.2 * (len(f) + len(h))) or len(f) + len(h) < 5
    assert kept.height >= s.n_interactions


def test_ml1m_counts():
    raw = read_raw(real_data("ml-1m"))
    s = split_multvae(raw.interactions, Protocol())
    assert s.user_ids.len() == 6034
    assert s.n_interactions == 575_272
    assert s.val.height == 603 and s.test.height == 603
    assert s.item_ids.len() == 3497
    # the rebuilt file has no timestamps; the reader must still find genres for evaluation
    assert raw.items is not None and raw.items.height == 3883


def test_ml100k_reads_genres():
    raw = read_raw(real_data("ml-100k"))
    assert raw.interactions.height == 100_000
    star_wars = raw.items.filter(pl.col("item_id") == 50).row(0, named=True)
    assert "Star Wars" in star_wars["title"] and "Sci-Fi" in star_wars["genres"]


@pytest.mark.parametrize("heldout", [0.5, 10_000])
def test_too_many_heldout_users_is_a_clear_error(heldout):
    from macrid.errors import DataError

    with pytest.raises(DataError, match="lower --heldout"):
        split_multvae(toy_interactions(), Protocol(heldout=heldout, min_rating=None))
