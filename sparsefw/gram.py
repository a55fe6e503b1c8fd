"""The damped Gram matrix shared by SparseGPT and the least-squares reconstruction (pure tensor
functions): G = X X^T of a layer's calibration inputs, made positive definite as in SparseGPT.

Source: Frantar & Alistarh 2023, "SparseGPT", Sec. 3 and the reference implementation
(``fasterprune``: dead inputs get diagonal 1, then lambda = percdamp * mean(diag) is added).
Computed in float64 on G's device: G can have condition numbers up to 1e8 on LLM layers
(docs/solver.md).
"""
from __future__ import annotations

import math

import torch

from .errors import SparseFWError


def check_layer_inputs(W: torch.Tensor, G: torch.Tensor, percdamp: float) -> None:
    """Input checks shared by SparseGPT and the least-squares reconstruction: W (d_out, d_in) and
    G (d_in, d_in) finite floating-point tensors, percdamp a finite number >= 0.

    Raises: SparseFWError saying what is wrong (shape, dtype, NaN/Inf, percdamp)."""
    if not isinstance(W, torch.Tensor) or not isinstance(G, torch.Tensor):
        raise SparseFWError("W and G must be torch tensors (weight (d_out, d_in), Gram (d_in, d_in))")
    if W.dim() != 2 or G.dim() != 2 or G.shape != (W.shape[1], W.shape[1]):
        raise SparseFWError(f"shape mismatch: W {tuple(W.shape)} needs a Gram matrix G of shape "
                            f"({W.shape[-1]}, {W.shape[-1]}), got {tuple(G.shape)}; "
                            "pass the weight as (d_out, d_in) and G = X X^T of its inputs")
    if not (W.is_floating_point() and G.is_floating_point()):
        raise SparseFWError("W and G must be floating-point tensors")
    if not (torch.isfinite(W).all() and torch.isfinite(G).all()):
        raise SparseFWError("weights or Gram matrix contain NaN/Inf; check the model and calibration data")
    if not isinstance(percdamp, (int, float)) or not math.isfinite(percdamp) or percdamp < 0:
        raise SparseFWError(f"percdamp must be a finite number >= 0 (e.g. 0.01), got {percdamp!r}")


def damped_hessian(G: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The dampened Hessian of SparseGPT: dead inputs get diag 1, then + percdamp * mean(diag) I.

    Source: SparseGPT reference implementation (``fasterprune``), Frantar & Alistarh 2023 Sec. 3.

    Args:
        G: (d_in, d_in) float Gram matrix X X^T (symmetric positive semi-definite).
        percdamp: dampening as a fraction of the mean diagonal (>= 0).
    Returns:
        (H, dead, lam): H (d_in, d_in) float64 dampened matrix, dead (d_in,) bool inputs whose
        diagonal was 0, lam the dampening added (float, squared activation units).
    """
    H = G.detach().to(torch.float64).clone()
    H = 0.5 * (H + H.T)  # exact symmetry for Cholesky
    diag = torch.diagonal(H)
    dead = diag == 0
    idx = torch.nonzero(dead, as_tuple=True)[0]
    H[idx, idx] = 1.0
    lam = float(percdamp) * float(torch.diagonal(H).mean())
    torch.diagonal(H).add_(lam)
    return H, dead, lam


def cholesky(A: torch.Tensor, what: str = "the dampened Gram matrix") -> torch.Tensor:
    """Lower Cholesky factor of A (d, d) or a batch (b, d, d) of symmetric positive definite
    matrices (``torch.linalg.cholesky_ex``; same dtype and device as A).

    Raises: SparseFWError naming ``what`` and saying to raise the dampening when a factorization
    fails (A not positive definite)."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info.max() if info.dim() else info) != 0:
        raise SparseFWError(f"{what} is not positive definite (Cholesky failed); "
                            "increase percdamp (e.g. 0.01 or 0.1) or use more calibration tokens")
    return L
