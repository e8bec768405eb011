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
    g = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(len(x), (1,), generator=g))
    centres = [x[first]]
    dist = 1.0 - x @ centres[0]  # (N,) cosine distance to the nearest centre so far
    for _ in range(1, k):
        p = dist.clamp_min(0).square().cpu()
        nxt = int(torch.multinomial(p / p.sum() if p.sum() > 0 else torch.ones_like(p), 1, generator=g))
        centres.append(x[nxt])
        dist = torch.minimum(dist, 1.0 - x @ x[nxt])
    c = torch.stack(centres)  # (k, D)
    for _ in range(iterations):
        assign = (x @ c.T).argmax(1)  # (N,)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = sums.norm(dim=1) == 0
        c = torch.where(empty.unsqueeze(1), c, F.normalize(sums, dim=1))
    return c
