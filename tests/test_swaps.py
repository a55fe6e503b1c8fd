"""Exact swap refinement (sparsefw/swaps.py): a hand-computed swap, the change formula against
direct evaluation, local optimality by exhaustive check, patterns kept, never worse per row."""
import itertools

import pytest
import torch

from sparsefw.errors import SparseFWError
from sparsefw.fw import row_errors
from sparsefw.masks import Pattern, parse_pattern, prune_mask, wanda_scores
from sparsefw.swaps import CHUNK, smallest_k, swap_refine


def correlated(d_out=12, d_in=16, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d_in, n, generator=g)
    X[1::2] += 1.5 * X[0::2]
    X *= torch.rand(d_in, 1, generator=g) * 2 + 0.2
    return torch.randn(d_out, d_in, generator=g), X @ X.T


def test_one_swap_by_hand():
    # w = (1, 1), keep 1. G = [[1, 0.9], [0.9, 1]] -> pruning either gives f = 1: no swap helps.
    # With G = diag(1, 4): pruning entry 1 costs 4, pruning entry 0 costs 1 -> swap to keep entry 1.
    W = torch.tensor([[1.0, 1.0]])
    p = parse_pattern("unstructured", 0.5)
    M = torch.tensor([[True, False]])
    r = swap_refine(W, torch.diag(torch.tensor([1.0, 4.0])), M, p)
    assert r.mask.tolist() == [[False, True]] and r.swaps == 1
    assert float(r.delta[0]) == pytest.approx(1.0 - 4.0)
    r2 = swap_refine(W, torch.tensor([[1.0, 0.9], [0.9, 1.0]]), M, p)
    assert r2.mask.tolist() == [[True, False]] and r2.swaps == 0


@pytest.mark.parametrize("pattern,K", [("unstructured", 1), ("unstructured", 16), ("2:4", 1), ("2:4", 16)])
def test_exact_change_pattern_and_local_optimality(pattern, K):
    W, G = correlated(seed=3)
    p = parse_pattern(pattern, 0.5)
    M0 = prune_mask(wanda_scores(W, G.diagonal().sqrt()), p)
    r = swap_refine(W, G, M0, p, working_set=K, max_rounds=500, rtol=0.0)
    e0, e1 = row_errors(W, G, M0), row_errors(W, G, r.mask)
    assert torch.allclose(e0 + r.delta, e1, rtol=1e-4, atol=1e-3)      # tracked change = exact change
    assert (e1 <= e0 * (1 + 1e-6)).all() and e1.sum() < e0.sum()
    if p.kind == "nm":
        assert (r.mask.view(W.shape[0], -1, 4).sum(-1) == 2).all()
    else:
        assert torch.equal(r.mask.sum(1), M0.sum(1))
    # the stopping rule: here (d_in = 16) a working set of K = 16 holds the whole row, and the
    # unstructured search (best keep / best prune, each with its best partner) leaves no single
    # improving pair (every pair checked); K = 1 only pairs the best keep with the best prune
    worse_pairs = 0
    for i in range(W.shape[0]):
        m = r.mask[i]
        groups = [range(W.shape[1])] if p.kind != "nm" else [range(g, g + 4) for g in range(0, W.shape[1], 4)]
        for grp in groups:
            for j, l_ in itertools.product([a for a in grp if not m[a]], [b for b in grp if m[b]]):
                mm = m.clone()
                mm[j], mm[l_] = True, False
                rr = W[i] * ~mm
                worse_pairs += float(rr @ G @ rr) < float(e1[i]) * (1 - 1e-3)
    # N:M pairs only the best keep and prune candidate of each group: a few misses allowed
    allowed = 2 * W.shape[0] if K == 1 else (0 if p.kind != "nm" else W.shape[0])
    assert worse_pairs <= allowed, worse_pairs


def test_per_matrix_unchanged_and_bad_shapes():
    W, G = correlated()
    p = parse_pattern("per-matrix", 0.5)
    M = prune_mask(W.abs(), p)
    assert torch.equal(swap_refine(W, G, M, p).mask, M)
    with pytest.raises(SparseFWError, match="shapes"):
        swap_refine(W, G[:4, :4], M, p)


def test_rows_with_all_kept_or_all_pruned_keep_their_counts():
    """Rows may keep different counts (a per-matrix mask refined within rows): rows with nothing
    kept or nothing pruned have no pair to swap and stay as they are; the others keep their
    counts. Regression: such a row gave its kept entries as keep candidates and lost one."""
    torch.manual_seed(0)
    X = torch.randn(64, 6)
    G = X.t() @ X
    W = torch.randn(4, 6)
    M = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    r = swap_refine(W, G, M, Pattern("unstructured", 0.5))
    assert r.mask.sum(1).tolist() == [6, 0, 2, 3]
    assert torch.equal(r.mask[:2], M[:2])
    R0, R1 = W * ~M, W * ~r.mask
    f0, f1 = ((R0 @ G) * R0).sum(1), ((R1 @ G) * R1).sum(1)
    assert bool((f1 <= f0 + 1e-5).all()) and torch.allclose(f1 - f0, r.delta.float(), atol=1e-4)


def test_smallest_k_selects_the_values_topk_does():
    # chunked selection: the K smallest values of every row, including rows whose K smallest sit
    # in one chunk, rows with ties at the K-th value, and +inf (ineligible) entries
    g = torch.Generator().manual_seed(0)
    T = torch.randn(6, 40 * CHUNK, generator=g)
    T[0, :8] = -10.0 - torch.arange(8.0)                  # all 8 smallest in the first chunk
    T[1] = torch.randint(0, 5, (40 * CHUNK,), generator=g).float()   # many ties
    T[2, 1:] = float("inf")                               # one finite entry...
    T[2, 5 * CHUNK:5 * CHUNK + 7] = 0.5                   # ...and seven more in another chunk
    T[3] = torch.arange(40 * CHUNK, 0, -1).float()        # the smallest at the end of the row
    for K in (1, 3, 8):
        idx = smallest_k(T, K)
        assert idx.shape == (6, K)
        assert all(len(set(r.tolist())) == K for r in idx)                     # distinct columns
        want = torch.topk(T, K, dim=1, largest=False).values
        assert torch.equal(T.gather(1, idx).sort(1).values, want.sort(1).values)
    assert sorted(smallest_k(T, 8)[0].tolist()) == list(range(8))
    assert sorted(smallest_k(T, 2)[3].tolist()) == [40 * CHUNK - 2, 40 * CHUNK - 1]
