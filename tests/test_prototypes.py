"""Prototype re-centring (macrid/model/prototypes.py) against a numpy restatement of spherical k-means."""

import numpy as np
import torch

from macrid.model.prototypes import refine, spherical_kmeans
from macrid.training.metrics import nmi


def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_one_lloyd_step_moves_each_centre_to_its_members_mean_direction():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 4))
    centres = rng.standard_normal((3, 4))
    centres[2] = -10 * np.abs(x).max() * np.ones(4)  # far from nothing in particular: may have members or not
    xn, cn = unit(x), unit(centres)
    nearest = (xn @ cn.T).argmax(1)
    want = np.stack([unit(xn[nearest == k].sum(0, keepdims=True))[0] if (nearest == k).any() else cn[k]
                     for k in range(3)])
    got = refine(torch.tensor(x, dtype=torch.float32), torch.tensor(centres, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_centre_without_members_stays_where_it_is():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])  # the third is nobody's nearest
    got = refine(x, centres)
    np.testing.assert_allclose(got[2].numpy(), [-2 ** -0.5, -2 ** -0.5], atol=1e-6)
    np.testing.assert_allclose(got[1].numpy(), [0.0, 1.0], atol=1e-6)


def test_kmeans_pp_separates_well_separated_directions():
    rng = np.random.default_rng(1)
    axes = np.eye(6)[:5]  # 5 orthogonal directions
    labels = rng.integers(0, 5, 500)
    x = axes[labels] + 0.15 * rng.standard_normal((500, 6))
    centres = spherical_kmeans(torch.tensor(x, dtype=torch.float32), 5, seed=3)
    found = (torch.nn.functional.normalize(torch.tensor(x, dtype=torch.float32), dim=1) @ centres.T).argmax(1).numpy()
    assert nmi(labels, found) == 1.0
