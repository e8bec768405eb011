"""Synthetic interactions with planted structure: the offline default dataset.

Ground truth that a disentangled recommender should recover:
- K categories; every item belongs to exactly one (macro structure);
- power-law item popularity (Zipf exponent `zipf`);
- F latent factors per item, and a per-(user, category) taste vector over them
  (micro structure: within a category, what a user picks depends on F factors);
- each user mixes 2..max_user_categories categories with Dirichlet weights.

The planted category is written as the item's genre, so evaluation can measure
how well the learned concepts align with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from macrid.readers import RawData


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


def generate(spec: SyntheticSpec) -> RawData:
    rng = np.random.default_rng(spec.seed)
    M, K, F = spec.n_items, spec.K, spec.factors
    category = rng.integers(0, K, size=M)  # (M,)
    factors = rng.standard_normal((M, F)).astype(np.float32)  # (M, F)
    log_pop = np.empty(M)
    members = []
    for k in range(K):
        idx = np.flatnonzero(category == k)
        ranks = rng.permutation(len(idx)) + 1
        log_pop[idx] = -spec.zipf * np.log(ranks)
        members.append(idx)

    sizes = np.clip(
        rng.lognormal(np.log(spec.mean_items), 0.6, size=spec.n_users), spec.min_items, spec.max_items
    ).astype(int)
    users, items = [], []
    for u in range(spec.n_users):
        n_cat = rng.integers(2, max(2, min(K, spec.max_user_categories)) + 1)
        cats = rng.choice(K, size=n_cat, replace=False)
        weights = rng.dirichlet(np.ones(n_cat))
        per_cat = np.maximum(1, np.round(weights * sizes[u]).astype(int))
        for k, n in zip(cats, per_cat):
            pool = members[k]
            n = min(n, len(pool))
            taste = rng.standard_normal(F)  # (F,)
            logits = log_pop[pool] + spec.taste * factors[pool] @ taste / np.sqrt(F)
            keys = logits + rng.gumbel(size=len(pool))  # Gumbel-top-n = sampling without replacement
            chosen = pool[np.argpartition(-keys, n - 1)[:n]]
            users.append(np.full(n, u, dtype=np.int64))
            items.append(chosen)
    interactions = pl.DataFrame({
        "user_id": np.concatenate(users),
        "item_id": np.concatenate(items).astype(np.int64),
        "rating": pl.Series([None] * int(sum(map(len, users))), dtype=pl.Float64),
    })
    meta = pl.DataFrame({
        "item_id": np.arange(M, dtype=np.int64),
        "title": [f"item {i} (category {category[i]})" for i in range(M)],
        "genres": [[f"category-{category[i]}"] for i in range(M)],
    })
    return RawData(interactions, meta, f"synthetic(seed={spec.seed}, users={spec.n_users}, items={M}, K={K})",
                   "synthetic")
