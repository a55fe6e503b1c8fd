"""SparseGPT for one layer: adaptive mask selection with OBS weight updates (pure tensor functions).

Source: Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot" (ICML), Algorithm 1, and its reference implementation (IST-DASLab/sparsegpt,
``SparseGPT.fasterprune``). For a layer with weight W (d_out, d_in) and Gram matrix
G = X X^T (d_in, d_in) (the paper's Hessian H = 2 X X^T / n up to a factor that does not change
the result), the columns are visited left to right in blocks of ``blocksize``:

1. H = G with dead inputs (diag 0) set to 1 and their weights set to 0; H <- H + lambda I with
   lambda = percdamp * mean(diag H); U = upper Cholesky factor of H^-1 (so row j of U holds the
   OBS update direction of column j given that columns < j are already fixed).
2. At the start of every block the mask of the block is chosen from the OBS saliency
   w_ij^2 / U_jj^2 of the *current* (already updated) weights (adaptive mask selection, Sec. 3.3).
   For N:M the choice is made every m columns instead, over the next m columns (Sec. 3.4).
3. Column j: pruned entries are set to 0 and the error e = (w_j - q_j) / U_jj is spread over the
   remaining columns of the block, W[:, j:] -= e U[j, j:] (the OBS update, Eq. 3 / Algorithm 1);
   after the block, the accumulated errors update all later columns with one GEMM.

Budgets (so the result meets :class:`sparsefw.masks.Pattern` exactly):

* ``unstructured`` (k = round((1-s) d_in) kept per row, Wanda's per-output comparison group):
  every row prunes its own share of every block, P_b = round(P i2/d_in) - round(P i1/d_in) of the
  P = d_in - k pruned entries per row, chosen per row by smallest w^2/U_jj^2. The telescoping
  sum makes every row end with exactly k kept. This differs from the reference, which picks the
  smallest s-fraction of the whole block (so rows end with different counts); per-output
  selection is the comparison group Wanda (Sun et al. 2023, Sec. 5) found better for LLMs and is
  the convention of all our other methods, so the comparison is like for like.
* ``per-matrix``: the reference's per-block selection over the whole block, with the same
  telescoping budget so the matrix ends with exactly round((1-s) d_out d_in) kept.
* ``N:M``: the reference (the m - n smallest w^2/U_jj^2 of every group of m pruned when the
  group's first column is reached; ``blocksize`` must be a multiple of m).

Numerics: everything is computed in float64 (G can have condition numbers up to 1e8 on LLM
layers, docs/solver.md) for inputs up to :data:`sparsefw.gram.FACTOR_FLOAT64_MAX_DIM` (16384) wide,
and in float32, as in the reference, above (so that a Llama-3-70B down_proj, d_in 28672, needs
9.9 GB instead of 19.7 GB); the result is returned in float32.
"""
from __future__ import annotations

import math

import torch

from .errors import SparseFWError
from .gram import check_layer_inputs, cholesky, damped_hessian, factor_dtype, symmetrize_
from .masks import Pattern


def _prune_counts(total: int, length: int, i1: int, i2: int) -> int:
    """Share of ``total`` pruned entries assigned to columns [i1, i2) of ``length`` (telescoping)."""
    return int(math.floor(total * i2 / length + 0.5)) - int(math.floor(total * i1 / length + 0.5))


def _smallest_per_row(scores: torch.Tensor, count: int) -> torch.Tensor:
    """(r, c) bool with True on the ``count`` smallest entries of every row."""
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if count > 0:
        out.scatter_(1, torch.topk(scores, count, dim=1, largest=False).indices, True)
    return out


def _check_args(W, G, pattern: Pattern, blocksize, percdamp) -> None:
    """SparseFWError for bad shapes, non-finite input, N:M not dividing d_in, a bad blocksize."""
    check_layer_inputs(W, G, percdamp)
    pattern.check_shape(tuple(W.shape))
    if not isinstance(blocksize, int) or blocksize < 1:
        raise SparseFWError(f"blocksize must be a positive integer (e.g. 128), got {blocksize!r}")
    if pattern.kind == "nm" and blocksize % pattern.m != 0:
        raise SparseFWError(f"blocksize {blocksize} must be a multiple of M = {pattern.m} for the "
                            f"N:M pattern {pattern} (e.g. 128)")


def sparsegpt_prune(W: torch.Tensor, G: torch.Tensor, pattern: Pattern, blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one layer with SparseGPT (Frantar & Alistarh 2023, Algorithm 1).

    Args:
        W: (d_out, d_in) float weights (any float dtype; not modified).
        G: (d_in, d_in) float Gram matrix X X^T of the layer's calibration inputs (float64
            recommended up to d_in 16384, float32 suffices above; any positive scale).
        pattern: sparsity pattern (:func:`sparsefw.masks.parse_pattern`); see the module
            docstring for how each kind's budget is met exactly.
        blocksize: columns per lazy-update block (128 in the paper); for N:M a multiple of m.
        percdamp: dampening lambda = percdamp * mean(diag G) added to the diagonal (0.01).
    Returns:
        (W_new, mask): W_new (d_out, d_in) float32 with pruned entries exactly 0 and the kept
        ones updated by OBS; mask (d_out, d_in) bool, True = kept, meeting ``pattern`` exactly
        (k per row, k per matrix, or n in every group of m). Inputs that never fire
        (diag G = 0) get weight 0 whether kept or not, as in the reference.
    Raises:
        SparseFWError: shape mismatch, non-finite W or G, N:M not dividing d_in, blocksize not a
            positive integer (multiple of m for N:M), negative percdamp, or a Hessian that is not
            positive definite after dampening.
    """
    _check_args(W, G, pattern, blocksize, percdamp)
    d_out, d_in = W.shape
    H, dead, _ = damped_hessian(G, percdamp, factor_dtype(d_in))
    Wd = W.detach().to(H.dtype, copy=True)
    Wd[:, dead] = 0.0
    L = cholesky(H, "the dampened Gram matrix")
    del H
    Hinv = torch.cholesky_inverse(L)
    del L
    U = torch.linalg.cholesky(symmetrize_(Hinv), upper=True)  # H^-1 = U^T U
    del Hinv

    if pattern.kind == "unstructured":
        total = d_in - pattern.kept_per_row(d_in)            # pruned per row
    elif pattern.kind == "per-matrix":
        total = d_out * d_in - int(round((1.0 - pattern.sparsity) * d_out * d_in))
    else:
        total = 0
    pruned = torch.zeros(d_out, d_in, dtype=torch.bool, device=W.device)
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        count = i2 - i1
        W1 = Wd[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1)
        Err1 = torch.zeros_like(W1)
        P1 = pruned[:, i1:i2]  # view: filled in place
        if pattern.kind == "unstructured":
            P1.copy_(_smallest_per_row(W1.square() / d1.square(), _prune_counts(total, d_in, i1, i2)))
        elif pattern.kind == "per-matrix":
            nb = _prune_counts(total, d_in, i1, i2)
            if nb > 0:
                score = (W1.square() / d1.square()).flatten()
                block = torch.zeros(d_out * count, dtype=torch.bool, device=W.device)
                block[torch.topk(score, nb, largest=False).indices] = True
                P1.copy_(block.view(d_out, count))
        for i in range(count):
            if pattern.kind == "nm" and i % pattern.m == 0:
                j = slice(i, i + pattern.m)
                P1[:, j] = _smallest_per_row(W1[:, j].square() / d1[j].square(),
                                             pattern.m - pattern.n)
            w = W1[:, i]
            q = torch.where(P1[:, i], 0.0, w)
            err = (w - q) / U1[i, i]
            W1[:, i:].sub_(err.unsqueeze(1) * U1[i, i:].unsqueeze(0))
            W1[:, i] = q
            Err1[:, i] = err
        Wd[:, i1:i2] = W1
        if i2 < d_in:
            Wd[:, i2:].sub_(Err1 @ U[i1:i2, i2:])
    mask = ~pruned
    W_new = Wd.to(torch.float32)
    W_new[pruned] = 0.0
    return W_new, mask
