"""How learned item concepts line up with known labels (genres, planted categories), and how evenly they are used.

Genre rule: an item's genre is its first listed genre (MovieLens lists several); items without a genre are
left out. "any-genre purity" counts an item as matching when its concept's majority first genre is any of
its genres, which forgives multi-genre items for landing in a neighbouring genre's concept.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from macrid.training.metrics import ari, nmi, purity


def genre_alignment(concept: np.ndarray, genres: list) -> dict:
    """concept (M,) learned labels; genres: M lists of genre names (or None). -> NMI, ARI, purity, counts."""
    known = np.array([g is not None and len(g) > 0 for g in genres])
    if known.sum() < 2:
        return {"items": int(known.sum()), "genres": 0}
    first = np.array([g[0] for g, ok in zip(genres, known) if ok])
    learned = np.asarray(concept)[known]
    majority = {k: Counter(first[learned == k]).most_common(1)[0][0] for k in np.unique(learned)}
    sets = [set(g) for g, ok in zip(genres, known) if ok]
    any_match = float(np.mean([majority[k] in s for k, s in zip(learned, sets)]))
    return {"items": int(known.sum()), "genres": len(set(first)), "nmi": nmi(first, learned),
            "ari": ari(first, learned), "purity": purity(learned, first), "any_genre_purity": any_match}


def usage(concept: np.ndarray, K: int) -> dict:
    """Items per concept, the entropy of that distribution (nats), the entropy over ln K (1 = all concepts
    equally used, 0 = one concept holds every item), and the largest concept's share."""
    counts = np.bincount(np.asarray(concept), minlength=K)
    p = counts / max(counts.sum(), 1)
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    return {"counts": counts.tolist(), "entropy": entropy, "entropy_ratio": entropy / np.log(K) if K > 1 else 1.0,
            "largest_share": float(p.max())}
