"""The MultVAE protocol split: counts on real ml-1m, determinism, vocabulary rules."""

import polars as pl
import pytest

from conftest import real_data
from macrid.data.batches import snapshot_uri
from macrid.data.prepare import prepare
from macrid.data.formats import RawData
from macrid.data.readers import read_raw
from macrid.data.split import Protocol


def toy_interactions(n_users=60, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = [(u, int(i), float(rng.integers(1, 6))) for u in range(n_users) for i in rng.choice(40, 15, replace=False)]
    return pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float64}, orient="row")


def split(tmp_path, df, protocol, name="d"):
    """prepare's tables for an in-memory frame, as polars frames, and its _meta.json."""
    lake = str(tmp_path / "lake")
    meta = prepare(RawData(df, None, "toy", "table"), lake, name, protocol)
    snap = snapshot_uri(lake, name)
    return {t: pl.read_parquet(f"{snap}/{t}/*.parquet") for t in ("items", "users", "train", "val", "test")}, meta


def test_split_is_deterministic_for_a_seed_and_changes_with_it(tmp_path):
    df = toy_interactions()
    a, _ = split(tmp_path, df, Protocol(seed=1), "a")
    b, _ = split(tmp_path, df, Protocol(seed=1), "b")
    c, _ = split(tmp_path, df, Protocol(seed=2), "c")
    assert all(a[t].equals(b[t]) for t in a)
    assert not a["users"].equals(c["users"])


def test_split_rules_on_toy_data(tmp_path):
    df = toy_interactions()
    s, meta = split(tmp_path, df, Protocol(min_rating=4, heldout=0.1))
    kept = df.filter(pl.col("rating") >= 4)
    n_users = s["users"].height
    assert s["val"].height <= int(0.1 * n_users) and (s["users"]["split"] == "val").sum() == int(0.1 * n_users)
    train_items = set(s["train"]["items"].explode().to_list())
    assert train_items == set(range(s["items"].height))  # vocabulary = items of training users
    for part in (s["val"], s["test"]):
        for f, h in zip(part["foldin"].to_list(), part["heldout"].to_list()):
            assert not set(f) & set(h)
            assert len(h) == int(0.2 * (len(f) + len(h))) or len(f) + len(h) < 5
    assert kept.height >= meta["n_interactions_filtered"]
    # every kept user has >= 5 items; the item counts are the training bags' counts
    per_user = kept.group_by("user_id").len()
    assert set(s["users"]["user_id"]) == set(per_user.filter(pl.col("len") >= 5)["user_id"])
    counts = s["train"]["items"].explode().value_counts().sort("items")
    assert s["items"].sort("item_idx")["train_count"].to_list() == counts["count"].to_list()


def test_ml1m_counts(tmp_path):
    raw = read_raw(real_data("ml-1m"))
    lake = str(tmp_path / "lake")
    meta = prepare(raw, lake, "ml-1m", Protocol())
    assert meta["n_users"] == 6034
    assert meta["n_interactions_filtered"] == 575_272
    assert meta["val"]["users"] == 603 and meta["test"]["users"] == 603
    assert meta["n_items"] == 3497
    # the rebuilt file has no timestamps; the reader must still find genres for evaluation
    assert raw.items is not None and raw.items.height == 3883


def test_ml100k_reads_genres():
    raw = read_raw(real_data("ml-100k"))
    assert raw.interactions.height == 100_000
    star_wars = raw.items.filter(pl.col("item_id") == 50).row(0, named=True)
    assert "Star Wars" in star_wars["title"] and "Sci-Fi" in star_wars["genres"]


@pytest.mark.parametrize("heldout", [0.5, 10_000])
def test_too_many_heldout_users_is_a_clear_error(tmp_path, heldout):
    from macrid.errors import DataError

    with pytest.raises(DataError, match="lower --heldout"):
        split(tmp_path, toy_interactions(), Protocol(heldout=heldout, min_rating=None))
