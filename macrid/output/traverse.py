"""User-controllable recommendation (Sec. 2.4): traverse one dimension of a representation, and steer a user.

Traversal of dimension j from h* (an item's h_i, or component k of a user's mu):
1. k* = the prototype nearest to h* (cosine; the concept argmax_k c_k of Eq. 6);
2. (a, b): the values of h*_j for which k* stays the nearest prototype, each end by binary search;
3. B subranges a = a_0 < ... < a_B = b holding equal numbers of concept-k* items (by their h_ij);
4. one item per subrange maximising
       sum_t exp(cos(h_{i_t,-j}, h*_{-j}) / tau) + gamma * sum_{t<t'} exp(cos(h_{i_t,-j}, h_{i_t',-j}) / tau)
   (-j: the vector without dimension j), by beam search over the subranges in order.
The items' j-th values then rise monotonically, and the rest of each item stays close to h*.

Steering recomputes a user's top-N after setting one dimension of one component, or re-weighting the
concepts: A_ui = sum_k w_k c_ik exp(cos(z_k, h_i) / tau), with w = 1 the model's own score.
Plain numpy/torch on the item table h (M, D) and the prototypes m (K, D); no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from macrid.model.vae import item_concept

SEARCH_STEPS = 60  # bisection steps per end of (a, b): far below float32 resolution at any span


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_prototype(v: np.ndarray, m: np.ndarray) -> int:
    """argmax_k cos(v, m_k)."""
    return int(np.argmax(unit(m) @ unit(v)))


def dimension_range(h_star: np.ndarray, j: int, m: np.ndarray, span: float) -> tuple[float, float]:
    """(a, b) around h*_j inside which the nearest prototype stays k*, searched within h*_j +- span."""
    k_star = nearest_prototype(h_star, m)

    def inside(x: float) -> bool:
        v = h_star.copy()
        v[j] = x
        return nearest_prototype(v, m) == k_star

    def end(outward: float) -> float:
        lo, hi = float(h_star[j]), float(h_star[j]) + outward
        if inside(hi):
            return hi
        for _ in range(SEARCH_STEPS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if inside(mid) else (lo, mid)
        return lo

    return end(-span), end(span)


def subranges(values: np.ndarray, a: float, b: float, n: int) -> np.ndarray:
    """Edges a = a_0 < ... < a_n = b so that the values inside (a, b] fall about equally into the n subranges
    (a_{t-1}, a_t]. Returns (n+1,) edges; fewer subranges when fewer than n values lie inside."""
    inside = np.sort(values[(values > a) & (values <= b)])
    n = min(n, len(inside))
    if n == 0:
        return np.array([a, b])
    cuts = [inside[int(round(t * len(inside) / n)) - 1] for t in range(1, n)]  # the last value of each group
    return np.array([a, *cuts, b])


def beam_search(candidates: list[np.ndarray], h: np.ndarray, h_star: np.ndarray, j: int, tau: float,
                gamma: float, width: int) -> tuple[list[int], float]:
    """One item per group of candidates (ids into h), maximising Sec. 2.4's objective; returns (items, value).

    Exact when `width` is at least the number of partial sequences (the product of the groups' sizes)."""
    rest = [d for d in range(h.shape[1]) if d != j]
    hn = unit(h[:, rest])  # (M, D-1) h_{i,-j}, unit norm
    target = unit(h_star[rest])  # (D-1,)
    beams: list[tuple[float, list[int]]] = [(0.0, [])]
    for group in candidates:
        if len(group) == 0:
            continue
        to_star = np.exp(hn[group] @ target / tau)  # (G,)
        extended = []
        for value, items in beams:
            pair = np.exp(hn[group] @ hn[items].T / tau).sum(1) if items else np.zeros(len(group))  # (G,)
            gains = value + to_star + gamma * pair
            extended += [(float(g), items + [int(i)]) for g, i in zip(gains, group)]
        extended.sort(key=lambda e: -e[0])
        beams = extended[:width]
    value, items = beams[0]
    return items, value


@dataclass
class Trajectory:
    concept: int  # k*
    dimension: int  # j
    range: tuple[float, float]  # (a, b)
    edges: np.ndarray  # (B'+1,) subrange edges
    items: list[int]  # one item per subrange, in order
    values: list[float]  # their h_ij, rising
    objective: float


def traverse(h_star: np.ndarray, j: int, h: np.ndarray, m: np.ndarray, tau: float, n_steps: int = 8,
             gamma: float = 0.1, width: int = 16, exclude: int | None = None) -> Trajectory:
    """Sec. 2.4's traversal of dimension j from h* over the items h (M, D) with prototypes m (K, D).

    exclude: an item id never returned (the starting item)."""
    concept = unit(h) @ unit(m).T  # (M, K) cosines; the argmax is each item's concept
    members = np.flatnonzero(concept.argmax(1) == nearest_prototype(h_star, m))
    if exclude is not None:
        members = members[members != exclude]
    span = 2.0 * float(np.abs(h[:, j]).max() + abs(h_star[j]))
    a, b = dimension_range(h_star, j, m, span)
    edges = subranges(h[members, j], a, b, n_steps)
    groups = [members[(h[members, j] > lo) & (h[members, j] <= hi)] for lo, hi in zip(edges[:-1], edges[1:])]
    items, value = beam_search(groups, h, h_star, j, tau, gamma, width)
    return Trajectory(nearest_prototype(h_star, m), j, (a, b), edges, items, [float(h[i, j]) for i in items], value)


@dataclass(frozen=True)
class SteerItems:
    """The item side of steering, computed once per model (a service answers many requests from it)."""

    hn: torch.Tensor  # (M, D) h_i at unit norm
    c: torch.Tensor  # (M, K) c_i, Eq. 6 (the softmax)
    concept: torch.Tensor  # (M,) each item's concept: the mode, `item_concept`
    bias: torch.Tensor | None  # (M,) b_i (model.item_bias), or None for the paper's decoder

    @classmethod
    def of(cls, h: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None = None) -> SteerItems:
        return cls(hn=F.normalize(h, dim=1), c=c, concept=item_concept(c), bias=bias)


@torch.no_grad()
def steer(items: SteerItems, tau: float, mu: torch.Tensor, own_items: torch.Tensor, top_n: int,
          weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A user's top-N under edited components mu (K, D) and concept weights w (K,) (default all 1).

    The ranking score is log A_ui (+ b_i), A_ui = sum_k c_ik exp(cos(mu_k, h_i) / tau) (the decoder); a weight
    acts on the items whose concept (the mode, `item_concept`) is k: their A_ui is multiplied by w_k, so
    w_k = 0 removes every item of concept k from the list, and w_k = 2 doubles their A (adds log 2).
    tau is the model's temperature. Returns (items (N,), log-scores (N,), each item's concept (N,)); own_items
    are never returned, nor removed ones (so N may be below top_n)."""
    hn, c, concept = items.hn, items.c, items.concept
    w = torch.ones(c.shape[1], device=hn.device) if weights is None else weights.to(hn.device)
    cos = hn @ F.normalize(mu.to(hn.device), dim=1).T  # (M, K)
    scores = (c * torch.exp(cos / tau)).sum(1).log() + w[concept].log()  # (M,) -inf where w = 0
    if items.bias is not None:
        scores = scores + items.bias.to(hn.device)
    scores[own_items.to(hn.device)] = -torch.inf
    # only items still in the list: past them topk would return the user's own or the removed (-inf) ones
    available = int(torch.isfinite(scores).sum())
    top = torch.topk(scores, max(0, min(top_n, available))).indices  # (N,)
    return top, scores[top], concept[top]
