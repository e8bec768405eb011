"""A planted lake whose catalogue changes every day: the nightly loop's ground truth.

Day 0 holds `n_items` items of K planted categories (as in synthetic.py: power-law popularity within a
category, F latent factors per item). On each day d >= 1 a share `retire` of the live items is retired
(no interactions from day d on) and `new_items` x (the live count) new items are born, each with a planted
category, factors and a popularity of its own, boosted by `novelty` on the day it arrives (new items are
what people click that day). Users are a pool that grows by `new_users` a day; each user keeps a mix of 2
to 3 categories and a taste per category for good, and on each day a share `active` of the pool comes back
and picks items of its categories among the live ones (taste match plus Gumbel noise, synthetic.py's draw).

Written as one raw folder per day, each a complete input for `jobs/prepare.py` (or jobs/nightly.py):

    <out>/day-DD/interactions/part-0.parquet   user_id, item_id, day   the events of the last `window` days
    <out>/day-DD/items/part-0.parquet          item_id, title, genres  every item born by day DD (genre = category)
    <out>/catalogue.parquet                    item_id, category, born, retired   (retired = days + 1: never)
    <out>/_manifest.json                       written last: the spec and per-day counts
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import polars as pl

from macrid.data import lake
from macrid.data.synthetic import Catalogue, catalogue_of, draw_segments
from macrid.errors import ConfigError


@dataclass(frozen=True)
class DailySpec:
    days: int = 5
    n_users: int = 3000  # the pool on day 1
    n_items: int = 1500  # the catalogue on day 0
    K: int = 5
    factors: int = 3
    zipf: float = 0.8
    taste: float = 2.0
    new_items: float = 0.08  # new items a day, as a share of the live catalogue
    retire: float = 0.03  # live items retired a day, as a share
    novelty: float = 4.0  # a new item's popularity is multiplied by 1 + novelty on its first day
    active: float = 0.5  # share of the user pool that comes back on a day
    new_users: float = 0.05  # the pool grows by this share a day
    mean_items: float = 8.0  # typical items a user picks on a day it is active
    window: int = 3  # days of events in each day's folder
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("days", "n_users", "n_items", "K", "factors", "window"):
            if getattr(self, key) < 1:
                raise ConfigError(f"daily {key}={getattr(self, key)} must be at least 1")
        for key in ("new_items", "retire", "active", "new_users"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"daily {key}={getattr(self, key)} must be a share in [0, 1]")
        for key in ("zipf", "taste", "novelty", "mean_items"):
            if not np.isfinite(getattr(self, key)) or getattr(self, key) < 0:
                raise ConfigError(f"daily {key}={getattr(self, key)} must be a finite number >= 0")


@dataclass(frozen=True)
class World:
    """Every item and user of every day (the generator's ground truth)."""

    category: np.ndarray  # (M_all,) planted category
    factors: np.ndarray  # (M_all, F)
    popularity: np.ndarray  # (M_all,) base weight (r^-zipf of a random rank within the category)
    born: np.ndarray  # (M_all,) day the item arrives (0: the initial catalogue)
    retired: np.ndarray  # (M_all,) first day without it (days + 1: never)
    user_cats: np.ndarray  # (U_all, 3) a user's categories (the first n_cats valid)
    user_weights: np.ndarray  # (U_all, 3) their shares (0 for the invalid ones)
    user_taste: np.ndarray  # (U_all, 3, F)
    user_joined: np.ndarray  # (U_all,) the day the user joins the pool


def world(spec: DailySpec) -> World:
    rng = np.random.default_rng(spec.seed)
    K, F = spec.K, spec.factors
    sizes = [spec.n_items]
    live = spec.n_items
    for _ in range(spec.days):  # catalogue sizes: every day retires a share and adds a share of the live items
        born = int(round(spec.new_items * live))
        live = live - int(round(spec.retire * live)) + born
        sizes.append(born)
    M = sum(sizes)
    born = np.repeat(np.arange(spec.days + 1), sizes)
    category = rng.integers(0, K, size=M)
    factors = rng.standard_normal((M, F)).astype(np.float32)
    rank = rng.integers(1, max(2, spec.n_items // K) + 1, size=M)  # a random rank within a category's pool
    popularity = rank.astype(np.float64) ** -spec.zipf
    retired = np.full(M, spec.days + 1)
    for d in range(1, spec.days + 1):  # retire a share of the items live at the start of day d
        alive = np.flatnonzero((born < d) & (retired > d))
        gone = rng.choice(alive, int(round(spec.retire * len(alive))), replace=False)
        retired[gone] = d
    users = [spec.n_users] + [int(round(spec.new_users * spec.n_users))] * (spec.days - 1)
    U = sum(users)
    joined = np.repeat(np.arange(1, spec.days + 1), users)
    n_cats = rng.integers(2, min(3, K) + 1, size=U) if K >= 2 else np.ones(U, dtype=int)
    cats = np.argsort(rng.random((U, K)), axis=1)[:, :3] if K >= 3 else np.tile(np.arange(K), (U, 1))
    valid = np.arange(cats.shape[1]) < n_cats[:, None]
    weights = rng.gamma(1.0, size=cats.shape) * valid
    weights /= weights.sum(1, keepdims=True)
    taste = rng.standard_normal((U, cats.shape[1], F)).astype(np.float32)
    return World(category, factors, popularity, born, retired, cats, weights, taste, joined)


def day_events(spec: DailySpec, w: World, day: int, rng: np.random.Generator) -> pl.DataFrame:
    """The events of one day: user_id, item_id, day."""
    live = np.flatnonzero((w.born <= day) & (w.retired > day))
    weight = w.popularity[live] * np.where(w.born[live] == day, 1.0 + spec.novelty, 1.0)
    cat = _catalogue(w.category[live], w.factors, weight, spec.K, live)
    pool = np.flatnonzero(w.user_joined <= day)
    users = np.sort(rng.choice(pool, int(round(spec.active * len(pool))), replace=False))
    sizes = np.clip(rng.lognormal(np.log(max(spec.mean_items, 1.0)), 0.6, size=len(users)), 1, 10 * spec.mean_items + 1)
    valid = w.user_weights[users] > 0  # (n, 3)
    per = np.maximum(1, np.round(w.user_weights[users] * sizes[:, None])).astype(np.int64)
    seg_user = np.repeat(np.arange(len(users)), valid.shape[1])[valid.ravel()]
    seg_slot = np.tile(np.arange(valid.shape[1]), len(users))[valid.ravel()]
    seg_cat, seg_n = w.user_cats[users][valid], per[valid]
    taste = w.user_taste[users[seg_user], seg_slot]  # (segments, F)
    items, seg = draw_segments(cat, seg_cat, seg_n, lambda: taste, spec.taste, rng)
    return pl.DataFrame({"user_id": users[seg_user[seg]].astype(np.int64), "item_id": items.astype(np.int64),
                         "day": np.full(len(items), day, dtype=np.int32)})


def _catalogue(category: np.ndarray, factors: np.ndarray, weight: np.ndarray, K: int, ids: np.ndarray) -> Catalogue:
    """synthetic.Catalogue over the live items `ids` (their categories `category`), drawn with `weight`."""
    order = np.lexsort((-weight, category))  # by category, most popular first
    full = np.full(len(factors), -1)
    full[ids] = category  # catalogue_of reads each member's category by its global id
    return catalogue_of(full, factors, ids[order], weight[order], K)


def write_days(spec: DailySpec, uri: str, overwrite: bool = False) -> dict:
    """Write every day's folder, the catalogue and the manifest (last); returns the manifest."""
    w = world(spec)
    rng = np.random.default_rng([spec.seed, 1])
    events = {d: day_events(spec, w, d, rng) for d in range(1, spec.days + 1)}
    counts = []
    with lake.staged_dir(uri, overwrite=overwrite, marker="_manifest.json") as stage:
        for d in range(1, spec.days + 1):
            window = pl.concat([events[e] for e in range(max(1, d - spec.window + 1), d + 1)])
            folder = lake.join(stage, f"day-{d:02d}")
            lake.write_parquet(lake.join(folder, "interactions", "part-0.parquet"), window.to_arrow())
            lake.write_parquet(lake.join(folder, "items", "part-0.parquet"), items_table(w, d).to_arrow())
            counts.append({"day": d, "events": events[d].height, "window_interactions": window.height,
                           "live_items": int(((w.born <= d) & (w.retired > d)).sum()),
                           "new_items": int((w.born == d).sum()), "retired_items": int((w.retired == d).sum()),
                           "users": int(window["user_id"].n_unique())})
        lake.write_parquet(lake.join(stage, "catalogue.parquet"), pl.DataFrame(
            {"item_id": np.arange(len(w.born), dtype=np.int64), "category": w.category.astype(np.int64),
             "born": w.born.astype(np.int64), "retired": w.retired.astype(np.int64)}).to_arrow())
        manifest = {"spec": dataclasses.asdict(spec), "days": counts}
        lake.write_json(lake.join(stage, "_manifest.json"), manifest)
    return manifest


def day_uri(uri: str, day: int) -> str:
    return lake.join(uri, f"day-{day:02d}")


def items_table(w: World, day: int) -> pl.DataFrame:
    """item_id, title, genres of every item born by `day` (the planted category as its one genre)."""
    ids = np.flatnonzero(w.born <= day)
    category = pl.Series(w.category[ids], dtype=pl.Int64).cast(pl.String)
    return pl.DataFrame({"item_id": ids.astype(np.int64)}).with_columns(
        title=pl.lit("item ") + pl.col("item_id").cast(pl.String) + pl.lit(" (category ") + category
        + pl.lit(", day ") + pl.Series(w.born[ids], dtype=pl.Int64).cast(pl.String) + pl.lit(")"),
        genres=pl.concat_list(pl.lit("category-") + category))
