"""The K-sparse polytope (cnn/ksparse.py): K, the LMO by hand and against brute force over the
vertices, the feasibility map, the radius from the initial norm, bad input."""
from __future__ import annotations

import itertools

import pytest
import torch

from cnn.ksparse import in_ksparse, k_for, ksparse_feasible, ksparse_lmo, ksparse_norms, radius_from_init
from sparsefw.errors import SparseFWError


def vertices(n, k, r):
    """All vertices of C(K, r) in R^n: K entries +-r, the rest 0."""
    for pos in itertools.combinations(range(n), k):
        for signs in itertools.product((-1.0, 1.0), repeat=k):
            v = torch.zeros(n, dtype=torch.float64)
            v[list(pos)] = r * torch.tensor(signs, dtype=torch.float64)
            yield v


def test_k_for_hand_cases():
    assert k_for(100, 0.05) == 5
    assert k_for(10, 0.05) == 1            # k_min = 1
    assert k_for(10, 0.05, k_min=3) == 3
    assert k_for(2, 0.05, k_min=5) == 2    # capped at numel
    assert k_for(1000, 1.0) == 1000


def test_lmo_hand_computed():
    g = torch.tensor([0.5, -2.0, 1.0, 0.0, -0.1])
    assert torch.equal(ksparse_lmo(g, 2, 3.0), torch.tensor([0.0, 3.0, -3.0, 0.0, 0.0]))
    assert torch.equal(ksparse_lmo(g, 1, 0.5), torch.tensor([0.0, 0.5, 0.0, 0.0, 0.0]))
    # K = n: -r sign(g) everywhere (sign(0) = 0)
    assert torch.equal(ksparse_lmo(g, 5, 1.0), torch.tensor([-1.0, 1.0, -1.0, 0.0, 1.0]))
    # any shape, output keeps the shape
    G = torch.tensor([[1.0, -4.0], [3.0, 0.5]])
    assert torch.equal(ksparse_lmo(G, 2, 2.0), torch.tensor([[0.0, 2.0], [-2.0, 0.0]]))


def test_lmo_matches_brute_force_over_vertices():
    gen = torch.Generator().manual_seed(0)
    for n, k in [(5, 1), (5, 2), (6, 3), (4, 4)]:
        for _ in range(5):
            g = torch.randn(n, generator=gen, dtype=torch.float64)
            best = min(float(g @ v) for v in vertices(n, k, 1.7))
            v = ksparse_lmo(g, k, 1.7)
            assert float(g @ v) == pytest.approx(best, rel=1e-12)
            assert in_ksparse(v, k, 1.7, rtol=0)


def test_feasible_scales_into_set_and_keeps_feasible_points():
    x = torch.tensor([4.0, -1.0, 0.5, 0.0])            # ||x||_inf = 4 > r = 2
    y = ksparse_feasible(x, 2, 2.0)
    assert in_ksparse(y, 2, 2.0, rtol=0)
    assert float(y.abs().max()) == pytest.approx(2.0, rel=1e-6)  # box constraint is tight
    assert torch.allclose(y / y.norm(), x / x.norm())             # radial scaling only
    x = torch.tensor([1.5, 1.5, 1.5, 1.5])              # ||x||_1 = 6 > r K = 4, box fine
    y = ksparse_feasible(x, 2, 2.0)
    assert float(y.abs().sum()) == pytest.approx(4.0, rel=1e-6)
    x = torch.tensor([1.0, -0.5, 0.2, 0.0])             # already inside
    assert torch.equal(ksparse_feasible(x, 2, 2.0), x)
    assert ksparse_norms(torch.tensor([-3.0, 1.0])) == (3.0, 4.0)


def test_radius_from_init_sets_the_l2_diameter():
    r = radius_from_init(4.0, 16, tau=15.0)
    assert r == pytest.approx(15.0)                      # 15 * 4 / sqrt(16)
    v = ksparse_lmo(torch.randn(100), 16, r)
    assert float((v - (-v)).norm()) == pytest.approx(2 * 15.0 * 4.0, rel=1e-6)


@pytest.mark.parametrize("call", [
    lambda: ksparse_lmo(torch.ones(3), 0, 1.0),
    lambda: ksparse_lmo(torch.ones(3), 4, 1.0),
    lambda: ksparse_lmo(torch.ones(3), 1, -1.0),
    lambda: ksparse_lmo(torch.tensor([1.0, float("nan")]), 1, 1.0),
    lambda: k_for(10, 0.0),
    lambda: k_for(10, 1.5),
    lambda: radius_from_init(0.0, 3),
])
def test_bad_input_raises_sparsefw_error(call):
    with pytest.raises(SparseFWError):
        call()
