"""Synthetic interactions with planted structure: the offline default dataset, and scale data.

Ground truth that a disentangled recommender should recover:
- K categories; every item belongs to exactly one (macro structure);
- power-law item popularity within a category (the r-th most popular item has weight r^-zipf);
- F latent factors per item, and a taste vector over them per (user, category)
  (micro structure: within a category, what a user picks depends on F factors);
- each user mixes 2..max_user_categories categories with Dirichlet(1) weights, and holds a
  log-normal number of items (clipped to [min_items, max_items]).

Within a chosen category a user draws `oversample` x n items by popularity (with replacement),
scores them by taste match plus Gumbel noise, and keeps the best n distinct ones: a sample
roughly proportional to popularity x exp(taste match), computed for all users of a chunk at
once with flat numpy arrays. Memory is O(M) for the catalogue plus O(chunk) for the users, so
`write_shards` produces 10^6 items x 10^6 users as Parquet shards without ever holding the whole
interaction list or any dense user x item matrix. The planted category is the item's genre, so
evaluation can measure how well the learned concepts align with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl
from tqdm import tqdm

from macrid.data import lake
from macrid.data.formats import RawData
from macrid.errors import ConfigError


@dataclass(frozen=True)
class SyntheticSpec:
    n_users: int = 6000
    n_items: int = 2000
    K: int = 5
    factors: int = 3
    zipf: float = 0.8  # popularity of the r-th item of a category ~ r^-zipf
    taste: float = 2.0  # strength of the factor match in an item's choice probability
    min_items: int = 10
    max_items: int = 200
    mean_items: float = 40.0
    max_user_categories: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("n_users", "n_items", "K", "factors", "min_items", "max_items", "max_user_categories"):
            if getattr(self, key) < 1:
                raise ConfigError(f"synthetic {key}={getattr(self, key)} must be at least 1")
        for key in ("zipf", "taste", "mean_items"):
            if not np.isfinite(getattr(self, key)) or getattr(self, key) < 0:
                raise ConfigError(f"synthetic {key}={getattr(self, key)} must be a finite number >= 0")
        if self.min_items > self.max_items:
            raise ConfigError(f"synthetic min_items={self.min_items} is above max_items={self.max_items}")
        if self.K > self.n_items:
            raise ConfigError(f"synthetic K={self.K} categories need at least as many items (n_items={self.n_items})")


OVERSAMPLE = 3  # popularity draws per kept item, before the taste selection
CHUNK_USERS = 50_000  # users generated at once: ~40 x 3 x 50k draws, a few hundred MB at most


@dataclass(frozen=True)
class Catalogue:
    category: np.ndarray  # (M,) planted category of each item
    factors: np.ndarray  # (M, F) float32
    members: np.ndarray  # (M,) item ids grouped by category, most popular first within a category
    shifted_cdf: np.ndarray  # (M,) k + popularity CDF within category k, aligned with `members`
    ends: np.ndarray  # (K,) end of each category's run in `members`


def catalogue(spec: SyntheticSpec, rng: np.random.Generator) -> Catalogue:
    M, K = spec.n_items, spec.K
    category = rng.integers(0, K, size=M)
    factors = rng.standard_normal((M, spec.factors)).astype(np.float32)
    members = np.lexsort((rng.random(M), category))  # by category, random popularity order inside
    counts = np.bincount(category, minlength=K)
    starts = np.cumsum(counts) - counts
    cat_sorted = category[members]
    rank = np.arange(M) - starts[cat_sorted] + 1
    return catalogue_of(category, factors, members, rank.astype(np.float64) ** -spec.zipf, K)


def catalogue_of(category: np.ndarray, factors: np.ndarray, members: np.ndarray, weight: np.ndarray, K: int
                 ) -> Catalogue:
    """A Catalogue over `members` (item ids grouped by category), each drawn with its `weight` (aligned with
    members) within its category: the shifted CDF that `draw_segments` searches."""
    cat_sorted = category[members]
    ends = np.cumsum(np.bincount(cat_sorted, minlength=K))
    starts = ends - np.bincount(cat_sorted, minlength=K)
    csum = np.cumsum(weight)
    before = np.concatenate([[0.0], csum])[starts]  # cumulative weight before each category
    total = np.concatenate([[0.0], csum])[ends] - before
    shifted = cat_sorted + (csum - before[cat_sorted]) / np.maximum(total[cat_sorted], 1e-300)
    return Catalogue(category, factors, members, shifted, ends)


def user_chunk(spec: SyntheticSpec, cat: Catalogue, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n users' bags -> (local user row (N,), item id (N,)), vectorised over users."""
    K, F = spec.K, spec.factors
    max_c = max(2, min(K, spec.max_user_categories))
    sizes = np.clip(rng.lognormal(np.log(spec.mean_items), 0.6, size=n), spec.min_items, spec.max_items)
    n_cat = rng.integers(2, max_c + 1, size=n) if K >= 2 else np.ones(n, dtype=int)
    cats = np.argsort(rng.random((n, K)), axis=1)[:, :max_c]  # (n, max_c) distinct categories
    valid = np.arange(cats.shape[1]) < n_cat[:, None]
    weights = rng.gamma(1.0, size=cats.shape) * valid  # Dirichlet(1) over the valid ones
    weights /= weights.sum(1, keepdims=True)
    per = np.maximum(1, np.round(weights * sizes[:, None])).astype(np.int64)
    seg_user = np.repeat(np.arange(n), cats.shape[1])[valid.ravel()]
    seg_cat, seg_n = cats[valid], per[valid]  # one segment per (user, category)
    items, seg = draw_segments(cat, seg_cat, seg_n, lambda: rng.standard_normal((len(seg_n), F)).astype(np.float32),
                               spec.taste, rng)
    return seg_user[seg], items


def draw_segments(cat: Catalogue, seg_cat: np.ndarray, seg_n: np.ndarray, taste, strength: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each segment (a user's share of one category) draws up to seg_n distinct items of its category: OVERSAMPLE x
    n draws by popularity, kept by taste match plus Gumbel noise. taste() -> (segments, F) taste vectors, called
    after the popularity draws (the generator's order of random calls). Returns (item (N,), segment (N,))."""
    F = cat.factors.shape[1]
    pool = np.diff(np.concatenate([[0], cat.ends]))
    seg_n = np.minimum(seg_n, pool[seg_cat])
    draws = np.repeat(np.arange(len(seg_n)), seg_n * OVERSAMPLE)  # segment of each draw
    pos = np.searchsorted(cat.shifted_cdf, seg_cat[draws] + rng.random(len(draws)), side="right")
    pos = np.minimum(pos, cat.ends[seg_cat[draws]] - 1)
    item = cat.members[pos]
    tastes = taste()
    key = strength * np.einsum("nf,nf->n", cat.factors[item], tastes[draws]) / np.sqrt(F) + rng.gumbel(size=len(item))
    # the best key of each distinct (segment, item), then the seg_n best items of each segment
    order = np.lexsort((-key, item, draws))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (draws[order][1:] != draws[order][:-1]) | (item[order][1:] != item[order][:-1])
    keep = order[first]
    keep = keep[np.lexsort((-key[keep], draws[keep]))]
    seg = draws[keep]
    seg_start = np.searchsorted(seg, np.arange(len(seg_n)))
    rank = np.arange(len(keep)) - seg_start[seg]
    keep = keep[rank < seg_n[seg]]
    return item[keep], draws[keep]


def chunks(spec: SyntheticSpec, chunk_users: int = CHUNK_USERS) -> Iterator[tuple[Catalogue, pl.DataFrame]]:
    """(catalogue, user_id/item_id interactions of the next <= chunk_users users), in user order."""
    rng = np.random.default_rng(spec.seed)
    cat = catalogue(spec, rng)
    for first in range(0, spec.n_users, chunk_users):
        n = min(chunk_users, spec.n_users - first)
        rows, items = user_chunk(spec, cat, n, rng)
        yield cat, pl.DataFrame({"user_id": rows.astype(np.int64) + first, "item_id": items.astype(np.int64)})


def items_table(cat: Catalogue) -> pl.DataFrame:
    """item_id, title, genres: the planted category as the item's one genre."""
    category = pl.Series(cat.category, dtype=pl.Int64).cast(pl.String)
    return pl.DataFrame({"item_id": np.arange(len(cat.category), dtype=np.int64)}).with_columns(
        title=pl.lit("item ") + pl.col("item_id").cast(pl.String) + pl.lit(" (category ") + category + pl.lit(")"),
        genres=pl.concat_list(pl.lit("category-") + category),
    )


def generate(spec: SyntheticSpec) -> RawData:
    """The whole dataset in memory: for the default and test sizes."""
    parts, cat = [], None
    for cat, part in chunks(spec):
        parts.append(part)
    interactions = pl.concat(parts).with_columns(rating=pl.lit(None, pl.Float64))
    return RawData(interactions, items_table(cat), _source(spec), "synthetic")


def write_shards(spec: SyntheticSpec, uri: str, chunk_users: int = CHUNK_USERS, progress: bool = True,
                 overwrite: bool = False) -> dict:
    """Stream the dataset to <uri>/interactions/part-*.parquet and <uri>/items/part-0.parquet.

    One chunk of users is in memory at a time. The folder is published atomically with a
    `_manifest.json` written last (lake.staged_dir), so an interrupted run leaves nothing that looks
    complete. Returns the manifest. The raw layout is what
    `jobs/prepare.py --input <uri>/interactions --items <uri>/items` reads.
    """
    n_inter, cat = 0, None
    bar = tqdm(total=spec.n_users, unit="user", unit_scale=True, disable=not progress, desc="generate")
    with lake.staged_dir(uri, overwrite=overwrite, marker="_manifest.json") as stage:
        for i, (cat, part) in enumerate(chunks(spec, chunk_users)):
            lake.write_parquet(lake.join(stage, "interactions", f"part-{i:05d}.parquet"), part.to_arrow())
            n_inter += part.height
            bar.update(part["user_id"].n_unique())
        lake.write_parquet(lake.join(stage, "items", "part-0.parquet"), items_table(cat).to_arrow())
        manifest = {"users": spec.n_users, "items": spec.n_items, "interactions": n_inter, "source": _source(spec),
                    "spec": dataclasses.asdict(spec)}
        lake.write_json(lake.join(stage, "_manifest.json"), manifest)
    bar.close()
    return manifest


def _source(spec: SyntheticSpec) -> str:
    return f"synthetic(seed={spec.seed}, users={spec.n_users}, items={spec.n_items}, K={spec.K})"
