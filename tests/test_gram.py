"""Exact Gram sums (sparsefw/gram.py): the fixed-point grid, a hand-computed sum, independence of
the window order and split, and the error bound against exact (math.fsum) sums."""
import math
import random

import pytest
import torch

from sparsefw.gram import FixedPointSum, fixed_point_scale


def test_scale_keeps_bound_below_2_61():
    assert fixed_point_scale(1.0) == 60            # 1 < 2^1 -> 1 * 2^60 < 2^61
    assert fixed_point_scale(3.0) == 59
    assert fixed_point_scale(0.0) == 0 and fixed_point_scale(float("inf")) == 0
    for b in (1e-30, 0.7, 12345.678, 1e20):
        s = fixed_point_scale(b)
        assert 2.0 ** 60 <= b * 2.0 ** s < 2.0 ** 61


def test_hand_computed_sum():
    x1 = torch.tensor([[1.0, 2.0]])                 # x1^T x1 = [[1, 2], [2, 4]]
    x2 = torch.tensor([[0.5, -1.0], [0.0, 3.0]])    # [[0.25, -0.5], [-0.5, 10]]
    acc = FixedPointSum(2, fixed_point_scale(3 * 3.0 ** 2))
    acc.add_(x1)
    acc.add_(x2)
    assert torch.equal(acc.evaluate(), torch.tensor([[1.25, 1.5], [1.5, 14.0]], dtype=torch.float64))
    diag = FixedPointSum(2, acc.scale, diagonal=True)
    diag.add_(x1)
    diag.add_(x2)
    assert torch.equal(diag.evaluate(), torch.tensor([1.25, 14.0], dtype=torch.float64))


def test_order_and_split_do_not_change_a_bit():
    """The same windows in another order, or as two partial sums added as integers (two processes),
    give identical int64 sums; plain float64 sums of the same products do not."""
    torch.manual_seed(0)
    xs = [torch.randn(16, 24) * (10.0 ** torch.randint(-3, 3, (1, 24))) for _ in range(12)]
    bound = sum(x.shape[0] for x in xs) * max(float(x.abs().max()) for x in xs) ** 2
    s = fixed_point_scale(bound)

    def total(order):
        acc = FixedPointSum(24, s)
        for i in order:
            acc.add_(xs[i])
        return torch.cat([t.flatten() for t in acc.tensors()])

    ref = total(range(12))
    perm = list(range(12))
    random.Random(1).shuffle(perm)
    assert torch.equal(total(perm), ref)
    assert torch.equal(total(range(5)) + total(range(5, 12)), ref)
    plain = [sum((xs[i].t() @ xs[i]).double() for i in o) for o in (range(12), perm)]
    assert not torch.equal(plain[0], plain[1])      # float sums depend on the order


def test_error_against_exact_sums():
    """Against math.fsum of the same float32 window products: every entry within the proven bound
    n_windows * 2^-(scale+1) (plus the final float64 rounding), and the large entries to ~1e-12 relative."""
    torch.manual_seed(1)
    xs = [torch.randn(32, 8) for _ in range(50)]
    bound = sum(x.shape[0] for x in xs) * max(float(x.abs().max()) for x in xs) ** 2
    acc = FixedPointSum(8, fixed_point_scale(bound))
    prods = []
    for x in xs:
        acc.add_(x)
        prods.append((x.t() @ x).double())
    G = acc.evaluate()
    exact = torch.tensor([[math.fsum(float(p[i, j]) for p in prods) for j in range(8)] for i in range(8)],
                         dtype=torch.float64)
    err = (G - exact).abs()
    bound = len(xs) * 2.0 ** -(acc.scale + 1) + 2.0 ** -52 * exact.abs()   # grid + the final rounding
    assert bool((err <= bound).all())
    assert float((err / exact.abs()).diagonal().max()) < 1e-12


def test_upper_triangle_panels_give_a_symmetric_g():
    """With panels of 1 row (PANEL_BYTES shrunk), only the upper triangle is summed, the result
    is exactly symmetric and equals the one-panel result."""
    import sparsefw.gram as gram

    torch.manual_seed(2)
    xs = [torch.randn(10, 6) for _ in range(3)]
    s = fixed_point_scale(30 * max(float(x.abs().max()) for x in xs) ** 2)
    whole = FixedPointSum(6, s)
    old = gram.PANEL_BYTES
    gram.PANEL_BYTES = 20 * 6            # one row per panel
    try:
        split = FixedPointSum(6, s)
    finally:
        gram.PANEL_BYTES = old
    assert [t.shape for t in split.tensors()] == [(1, 6 - r) for r in range(6)]
    for x in xs:
        whole.add_(x)
        split.add_(x)
    G = split.evaluate()
    assert torch.equal(G, G.t())
    W = whole.evaluate()            # float32 products of other shapes: equal up to float32 rounding
    assert float((G - W).abs().max()) <= 1e-6 * float(W.abs().max())
    assert torch.equal(split.evaluate(torch.float32), G.float())


def test_float32_and_float64_rounding_paths_agree():
    """The float32 scaling path (scale <= 120) gives the bits of the float64 path."""
    torch.manual_seed(3)
    x = torch.randn(40, 16) * 1e-3
    s = fixed_point_scale(40 * float(x.abs().max()) ** 2)
    assert s <= 120
    fast = FixedPointSum(16, s)
    fast.add_(x)
    ref = (x.t() @ x).double().mul_(2.0 ** s).round_().to(torch.int64)
    assert torch.equal(fast.tensors()[0], ref)


def test_symmetrize_in_place_equals_the_formula():
    from sparsefw.gram import symmetrize_

    torch.manual_seed(4)
    A = torch.randn(37, 37, dtype=torch.float64)
    ref = 0.5 * (A + A.T)
    out = symmetrize_(A, panel=8)
    assert out is A and torch.equal(A, ref)


def test_all_finite_finds_nan_and_both_infinities():
    from sparsefw.gram import all_finite

    x = torch.randn(5, 7)
    assert all_finite(x, x.double(), x.bfloat16(), torch.empty(0, 3))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[4, 6] = bad
        assert not all_finite(y) and not all_finite(x, y) and not all_finite(y.bfloat16())


@pytest.mark.parametrize("d_in,d", [(100, 100), (64, 200), (40, 33)])
def test_bag_rows_panels_give_the_bits_of_one_pass(d_in, d):
    """bag_rows column panel by column panel (taken when the bags read G >= 8 times over) adds the
    same terms in the same order as one embedding_bag pass: the same bits, last narrow panel
    included; and the sums are the weighted row sums (float64 reference)."""
    import torch.nn.functional as F

    from sparsefw.gram import PANEL_COLS, PANEL_MIN_READS, bag_rows

    g = torch.Generator().manual_seed(d_in + d)
    G = torch.randn(d_in, d, generator=g)
    n_bags, per_bag = 64, 2 * PANEL_MIN_READS * d_in // 64 + 1
    idx = torch.randint(0, d_in, (n_bags * per_bag,), generator=g)
    w = torch.randn(idx.numel(), generator=g)
    bag, offsets = torch.arange(n_bags).repeat_interleave(per_bag), torch.arange(n_bags) * per_bag
    assert idx.numel() >= PANEL_MIN_READS * d_in and d > PANEL_COLS       # the panel path runs
    out = bag_rows(bag, idx, G, w, n_bags)
    one = F.embedding_bag(idx, G, offsets=offsets, per_sample_weights=w, mode="sum")
    assert torch.equal(out, one)
    ref = (w.double().unsqueeze(1) * G.double()[idx]).view(n_bags, per_bag, d).sum(1)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-4)
    few = bag_rows(bag[:per_bag], idx[:per_bag], G, w[:per_bag], 2)    # one bag read: the single pass
    assert torch.equal(few[0], one[0]) and not few[1].any()             # an empty bag sums to zeros


def test_row_blocks_split_and_give_the_bits_of_one_call():
    from sparsefw.gram import by_row_blocks, row_diffs, row_sums64
    heights = []
    x = torch.arange(129 * 3, dtype=torch.float32).view(129, 3)
    doubled, sums = by_row_blocks(lambda t: (heights.append(t.shape[0]) or 2 * t, t.sum(1)), x)
    assert heights == [64, 65]                      # the last block takes the remainder
    assert torch.equal(doubled, 2 * x) and torch.equal(sums, x.sum(1))
    heights.clear()
    by_row_blocks(lambda t: heights.append(t.shape[0]) or t, x[:127])
    assert heights == [127]                         # under two blocks: one call
    g = torch.Generator().manual_seed(0)
    for r, c in ((1, 5), (200, 7885), (333, 1001)):
        a, b = torch.randn(r, c, generator=g), torch.randn(r, c, generator=g)
        assert torch.equal(row_sums64(a, b), (a * b).sum(1, dtype=torch.float64))
        assert torch.equal(row_sums64(a), a.sum(1, dtype=torch.float64))
    m = torch.tensor([[True, False, True, False]] * 130)
    v = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 130)
    assert row_diffs(m, v).tolist() == [2] * 130     # columns 1 and 2 differ
    assert row_diffs(v).tolist() == [2] * 130        # two nonzeros
