"""Sparsity patterns, saliencies and selection (sparsefw/masks.py): hand-computed masks for the
baseline saliencies, the selection primitive and the patterns."""
import math

import pytest
import torch

from sparsefw.errors import SparseFWError
from sparsefw.masks import (Pattern, magnitude_scores, parse_pattern, prune_mask, ria_scores, select,
                            wanda_scores)

W14 = torch.tensor([[1.0, -3.0, 2.0, 0.5]])
NORMS4 = torch.tensor([4.0, 1.0, 1.0, 8.0])
W28 = torch.tensor([[1.0, 2.0, 3.0, 4.0, -8.0, 7.0, -6.0, 5.0],
                    [0.1, -0.4, 0.3, 0.2, 0.9, 0.95, 0.0, 0.0]])


def m(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_magnitude_1x4():
    assert torch.equal(prune_mask(magnitude_scores(W14), parse_pattern("unstructured", 0.5)), m([[0, 1, 1, 0]]))


def test_wanda_1x4():
    # scores |W| * ||X_j|| = [4, 3, 2, 4] -> keep columns 0 and 3
    s = wanda_scores(W14, NORMS4)
    assert torch.allclose(s, torch.tensor([[4.0, 3.0, 2.0, 4.0]]))
    assert torch.equal(prune_mask(s, parse_pattern("unstructured", 0.5)), m([[1, 0, 0, 1]]))


def test_ria_1x4():
    # one row: |W|/rowsum + |W|/colsum = |w|/6.5 + 1; times sqrt(norm) = [2, 1, 1, 2.828]
    s = ria_scores(W14, NORMS4)
    expect = torch.tensor([[(1 / 6.5 + 1) * 2, (3 / 6.5 + 1) * 1, (2 / 6.5 + 1) * 1, (0.5 / 6.5 + 1) * math.sqrt(8)]])
    assert torch.allclose(s, expect)
    assert torch.equal(prune_mask(s, parse_pattern("unstructured", 0.5)), m([[1, 0, 0, 1]]))


def test_ria_differs_from_wanda_2x2():
    W = torch.tensor([[10.0, 1.0], [1.0, 1.2]])
    n = torch.tensor([1.0, 1.0])
    # Wanda per-matrix keeps the two largest |W|: (0,0) and (1,1).
    # RIA: (0,1) = 1/11 + 1/2.2 = 0.545, (1,0) = 1/2.2 + 1/11 = 0.545, (1,1) = 1.2/2.2 + 1.2/2.2 = 1.09
    s = ria_scores(W, n)
    assert torch.allclose(s[1, 1], torch.tensor(2 * 1.2 / 2.2))
    assert torch.allclose(s[0, 0], torch.tensor(10 / 11 + 10 / 11))


def test_two_four_2x8():
    p = parse_pattern("2:4")
    assert p.sparsity == 0.5
    assert torch.equal(prune_mask(magnitude_scores(W28), p),
                       m([[0, 0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1, 0, 0]]))
    norms = torch.tensor([1.0, 1, 1, 1, 1, 1, 2, 2])
    # row 0 group 2: [8, 7, 12, 10] -> columns 6, 7; row 1 group 2: [0.9, 0.95, 0, 0] -> 4, 5
    assert torch.equal(prune_mask(wanda_scores(W28, norms), p),
                       m([[0, 0, 1, 1, 0, 0, 1, 1], [0, 1, 1, 0, 1, 1, 0, 0]]))


def test_four_eight_keeps_four_per_group():
    torch.manual_seed(0)
    s = torch.randn(5, 16)
    mask = prune_mask(s, parse_pattern("4:8"))
    assert (mask.view(5, 2, 8).sum(-1) == 4).all()
    # the kept ones are the 4 largest of each group
    for r in range(5):
        for g in range(2):
            grp = s[r, 8 * g:8 * g + 8]
            assert set(torch.nonzero(mask[r, 8 * g:8 * g + 8]).flatten().tolist()) == \
                set(torch.topk(grp, 4).indices.tolist())


def test_unstructured_and_per_matrix_2x8():
    assert torch.equal(prune_mask(magnitude_scores(W28), parse_pattern("unstructured", 0.5)),
                       m([[0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1, 0, 0]]))
    # per-matrix, keep 6 of 16: the six largest magnitudes are all in row 0
    assert torch.equal(prune_mask(magnitude_scores(W28), parse_pattern("per-matrix", 0.625)),
                       m([[0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]]))


def test_kept_per_row_rounding():
    # k = round((1 - s) d_in), the nearest count (Wanda's code would keep 576 - int(0.6 * 576) = 231)
    assert Pattern("unstructured", 0.6).kept_per_row(576) == 230
    assert Pattern("unstructured", 0.6).kept_per_row(10) == 4
    assert Pattern("unstructured", 0.5).kept_per_row(7) == 4  # round(3.5) -> 4 (banker's: 4)
    assert parse_pattern("2:4").kept_per_row(12) == 6


def test_select_budget_eligible_and_positive_only():
    s = torch.tensor([[5.0, -1.0, 3.0, 2.0]])
    elig = m([[0, 1, 1, 1]])
    assert torch.equal(select(s, parse_pattern("unstructured", 0.5), eligible=elig, budget=1), m([[0, 0, 1, 0]]))
    assert torch.equal(select(s, parse_pattern("per-matrix", 0.5), budget=3, positive_only=True),
                       m([[1, 0, 1, 1]]))
    assert torch.equal(select(-s, parse_pattern("per-matrix", 0.5), budget=3, positive_only=True),
                       m([[0, 1, 0, 0]]))


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 1.0), ("unstructured", -0.1),
                                              ("unstructured", float("nan")), ("per-matrix", None),
                                              ("3:3", None), ("0:4", None), ("dense", 0.5), ("2-4", 0.5)])
def test_bad_patterns(pattern, sparsity):
    with pytest.raises(SparseFWError):
        parse_pattern(pattern, sparsity)


def test_nm_must_divide_d_in():
    with pytest.raises(SparseFWError, match="multiple of 4"):
        prune_mask(torch.randn(2, 6), parse_pattern("2:4"))
