"""OWL: Outlier Weighed Layerwise sparsity (pure tensor functions; the dense pre-pass that feeds
them is :func:`sparsefw.pipeline.owl_block_sparsities`).

Yin et al., ICML 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for
Pruning LLMs to High Sparsity", Sec. 3 / Eq. 1 and the reference code: every decoder block l gets
its outlier ratio D_l, the fraction of its Linear weights whose Wanda score A_ij = |W_ij| ||X_j||_2
exceeds M times the mean score of the block; the ratios are mapped linearly onto a range of
width 2 lambda (more outliers -> lower sparsity), shifted so that the blocks' mean sparsity is the
target S (so every block lies within S +- 2 lambda).
"""
from __future__ import annotations

import torch

from .errors import SparseFWError


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Layerwise outlier distribution D of one decoder block (OWL Eq. 1).

    Args:
        scores: the block's Wanda scores |W| * ||X_j||_2, one (d_out, d_in) float tensor per
            Linear layer (any device).
        m: the outlier threshold M (OWL uses 5 for LLaMA at 70%): a score is an outlier when it
            is > M times the mean of all the block's scores.
    Returns:
        D in [0, 1], the fraction of the block's weights that are outliers (float).
    Raises:
        SparseFWError: no scores, or m <= 0.
    """
    if not scores or m <= 0:
        raise SparseFWError(f"outlier_ratio needs at least one score tensor and M > 0 (got M={m})")
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.double().sum()) for s in scores) / total
    return sum(int((s.double() > m * mean).sum()) for s in scores) / total


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsities from the blocks' outlier ratios (OWL reference code, ``prune_wanda_outlier``).

    D is rescaled to [0, 2 lambda], centred so that the keep ratios average to 1 - S, and the
    sparsity of block l is 1 - keep_l = S + lambda - 2 lambda (D_l - min D) / (max D - min D)
    shifted to mean S. Equal ratios give S everywhere.

    Args:
        ratios: D_l of every block (fractions). sparsity: the target mean S in [0, 1).
        lam: lambda, the largest deviation from S (OWL: 0.08).
    Returns:
        one sparsity per block, mean S, max - min = 2 lambda (unless all D are equal), each within
        S +- 2 lambda.
    Raises:
        SparseFWError: from :func:`check_owl_lambda`.
    """
    check_owl_lambda(sparsity, lam)
    d = torch.tensor(ratios, dtype=torch.float64)
    span = float(d.max() - d.min()) if d.numel() else 0.0
    if span <= 0:
        return [float(sparsity)] * len(ratios)
    keep = (d - d.min()) / span * (2 * lam)
    keep = keep - keep.mean() + (1 - sparsity)
    return [float(1 - k) for k in keep]


def check_owl_lambda(sparsity: float, lam: float) -> None:
    """Check that every block sparsity S +- 2 lambda lies in [0, 1).

    Raises:
        SparseFWError: lambda < 0 or too large for the target sparsity S, saying the largest one.
    """
    if not lam >= 0:
        raise SparseFWError(f"--owl-lambda must be >= 0, got {lam}")
    if sparsity - 2 * lam < 0 or sparsity + 2 * lam >= 1:
        raise SparseFWError(f"--owl-lambda {lam} can move block sparsities outside [0, 1) around the target "
                            f"{sparsity} (blocks lie within S +- 2 lambda): use a lambda < "
                            f"{min(sparsity, 1 - sparsity) / 2:.3g}")
