"""Prototype re-initialisation: spherical k-means with k-means++ seeding on the learned item vectors.

Training from random prototypes can settle in a local optimum where two planted categories share two
prototypes (benchmarks/scale.md). After a few epochs the item vectors h_i already group by
co-occurrence, so placing the prototypes at the centres of those groups (on the unit sphere, as the
concepts use cosines) gives each group its own prototype. Deterministic for a seed, so every DDP rank
computes the same prototypes from the same (synchronised) h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ITERATIONS = 25


@torch.no_grad()
def spherical_kmeans(x: torch.Tensor, k: int, seed: int = 0, iterations: int = ITERATIONS) -> torch.Tensor:
    """x (N, D) -> k unit centres (k, D): k-means++ seeding on cosine distance, then Lloyd steps on the sphere."""
    x = F.normalize(x.float(), dim=1)
    return lloyd(x, _kmeans_pp(x, k, seed), iterations)


@torch.no_grad()
def refine(x: torch.Tensor, centres: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """Lloyd steps on the sphere from the given centres (k, D): each concept keeps its index. -> (k, D) unit."""
    return lloyd(F.normalize(x.float(), dim=1), F.normalize(centres.float(), dim=1), iterations)


def _kmeans_pp(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k-means++ seeding on cosine distance: x (N, D) unit rows -> (k, D)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(len(x), (1,), generator=g))
    centres = [x[first]]
    dist = 1.0 - x @ centres[0]  # (N,) cosine distance to the nearest centre so far
    for _ in range(1, k):
        p = dist.clamp_min(0).square().cpu()
        nxt = int(torch.multinomial(p / p.sum() if p.sum() > 0 else torch.ones_like(p), 1, generator=g))
        centres.append(x[nxt])
        dist = torch.minimum(dist, 1.0 - x @ x[nxt])
    return torch.stack(centres)  # (k, D)


def lloyd(x: torch.Tensor, c: torch.Tensor, iterations: int) -> torch.Tensor:
    """x (N, D), c (k, D), both unit rows -> (k, D): assign by cosine, move each centre to its members' mean
    direction; a centre with no members stays where it is."""
    for _ in range(iterations):
        assign = (x @ c.T).argmax(1)  # (N,)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = sums.norm(dim=1) == 0
        c = torch.where(empty.unsqueeze(1), c, F.normalize(sums, dim=1))
    return c
