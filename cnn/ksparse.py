"""The K-sparse polytope: its LMO, feasibility step and init-scaled radius (pure tensor functions).

The K-sparse polytope of radius tau (Pokutta, Spiegel & Zimmer 2020, "Deep Neural Network
Training with Frank-Wolfe", arXiv 2010.07243, Sec. 3.1 / App. B) is

    C(K, tau) = conv{ v : v has K nonzero entries, each +-tau } = B_1(tau K) ∩ B_inf(tau),

the constraint set of SFW-pruning (Lu et al., ICLR 2022, "Learning Pruning-Friendly Networks via
Frank-Wolfe", Sec. 3). Its linear minimization oracle (LMO) over a gradient g is

    LMO(g) = argmin_{v in C} <g, v> = -tau * sign(g) on the K largest |g|, 0 elsewhere.

Its L2 diameter is 2 tau sqrt(K) (two opposite vertices), so the "diameter = 2 * tau_scale *
E||theta_0||_2" convention of Pokutta et al. (their ``create_k_sparse_constraints(...,
mode='initialization')``) gives the radius tau = tau_scale * E||theta_0||_2 / sqrt(K).

Everything here works on a tensor of any shape, treated as a flat vector of ``numel`` entries.
"""
from __future__ import annotations

import math

import torch

from sparsefw.errors import SparseFWError


def k_for(numel: int, k_frac: float = 0.05, k_min: int = 1) -> int:
    """Number of nonzeros K of the polytope vertices for a tensor of ``numel`` entries.

    K = min(numel, max(k_min, floor(k_frac * numel))) (Pokutta et al. 2020,
    ``create_k_sparse_constraints``; Lu et al. 2022 use k_frac = 5%).

    Args:
        numel: entries of the parameter tensor (>= 1). k_frac: fraction in (0, 1].
        k_min: lower bound on K (>= 1).
    Returns: K as an int in [1, numel].
    Raises:
        SparseFWError: numel < 1, k_frac outside (0, 1], or k_min < 1.
    """
    if int(numel) < 1:
        raise SparseFWError(f"a K-sparse polytope needs a non-empty tensor, got numel = {numel}")
    if not (isinstance(k_frac, (int, float)) and 0.0 < float(k_frac) <= 1.0):
        raise SparseFWError(f"k_frac must be a fraction in (0, 1] (e.g. 0.05 for 5%), got {k_frac!r}")
    if int(k_min) < 1:
        raise SparseFWError(f"k_min must be >= 1, got {k_min!r}")
    return int(min(int(numel), max(int(k_min), int(math.floor(float(k_frac) * int(numel))))))


def _check_k_radius(k: int, radius: float, numel: int) -> None:
    if not (1 <= int(k) <= int(numel)):
        raise SparseFWError(f"K must be in [1, numel = {numel}], got K = {k}; use k_for() to pick it")
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
        raise SparseFWError(f"the polytope radius tau must be a finite number > 0, got {radius!r}")


def ksparse_lmo(grad: torch.Tensor, k: int, radius: float) -> torch.Tensor:
    """LMO of the K-sparse polytope: argmin_{v in C(K, tau)} <grad, v>.

    v = -tau * sign(grad) on the K entries of largest |grad| (ties broken by ``torch.topk``),
    0 elsewhere (Pokutta et al. 2020, App. B, "K-sparse polytope"). Entries with grad = 0 get 0
    (sign 0), which is still a minimizer.

    Args:
        grad: tensor of any shape, float32/float64 (the gradient or momentum buffer d).
        k: number of nonzeros K, 1 <= K <= grad.numel(). radius: tau > 0 (parameter units).
    Returns:
        v, same shape and dtype as ``grad``, with ||v||_inf <= tau and ||v||_1 <= tau * K.
    Raises:
        SparseFWError: K or tau out of range, or grad has non-finite entries.
    """
    _check_k_radius(k, radius, grad.numel())
    g = grad.detach().reshape(-1)
    if not bool(torch.isfinite(g).all()):
        raise SparseFWError("the gradient passed to the K-sparse LMO has NaN/inf entries; "
                            "lower the learning rate or check the loss")
    v = torch.zeros_like(g)
    idx = torch.topk(g.abs(), int(k), sorted=False).indices
    v[idx] = -float(radius) * torch.sign(g[idx])
    return v.view_as(grad)


def ksparse_norms(x: torch.Tensor) -> tuple[float, float]:
    """(||x||_inf, ||x||_1) of a tensor of any shape, as Python floats (float64 accumulation)."""
    xf = x.detach().reshape(-1).double()
    if xf.numel() == 0:
        return 0.0, 0.0
    return float(xf.abs().max()), float(xf.abs().sum())


def in_ksparse(x: torch.Tensor, k: int, radius: float, rtol: float = 1e-5) -> bool:
    """Whether x lies in C(K, tau) = B_1(tau K) ∩ B_inf(tau), up to a relative tolerance ``rtol``.

    Args: x any shape/float dtype; k, radius as in :func:`ksparse_lmo`; rtol relative slack.
    Returns: True iff ||x||_inf <= tau (1 + rtol) and ||x||_1 <= tau K (1 + rtol).
    """
    _check_k_radius(k, radius, x.numel())
    linf, l1 = ksparse_norms(x)
    return linf <= radius * (1 + rtol) and l1 <= radius * k * (1 + rtol)


def ksparse_feasible(x: torch.Tensor, k: int, radius: float) -> torch.Tensor:
    """Feasibility step: scale x radially into C(K, tau).

    Returns c * x with c = min(1, tau / ||x||_inf, tau K / ||x||_1), the largest shrink factor
    c <= 1 that makes c * x feasible (0 is in C, so the segment [0, x] enters C). A feasible x is
    returned unchanged (a copy). This plays the role of Pokutta et al.'s ``make_feasible`` /
    ``shift_inside`` and of the final "scale into C" of SFW-Init (Lu et al. 2022, Alg. 3).

    Args: x any shape, float; k, radius as in :func:`ksparse_lmo`.
    Returns: tensor of x's shape and dtype inside C(K, tau).
    Raises: SparseFWError: K or tau out of range, or x has non-finite entries.
    """
    _check_k_radius(k, radius, x.numel())
    if not bool(torch.isfinite(x.detach()).all()):
        raise SparseFWError("cannot scale a tensor with NaN/inf entries into the K-sparse polytope")
    linf, l1 = ksparse_norms(x)
    c = 1.0
    if linf > radius:
        c = min(c, radius / linf)
    if l1 > radius * k:
        c = min(c, radius * k / l1)
    # a hair below the exact factor so float rounding cannot leave the set
    return x.detach().clone() if c >= 1.0 else x.detach() * (c * (1 - 1e-7))


def radius_from_init(init_norm: float, k: int, tau: float = 15.0) -> float:
    """Polytope radius from the init-norm convention: L2 diameter 2 tau_scale E||theta_0||_2.

    The K-sparse polytope's L2 diameter is 2 * radius * sqrt(K), so radius =
    tau * E||theta_0||_2 / sqrt(K) (Pokutta et al. 2020, Sec. 3.2, "diameter rescaled by the
    expected initialization norm"; their ``mode='initialization'``; Lu et al. 2022 use tau = 15).

    Args:
        init_norm: E||theta_0||_2 of the tensor under its initializer (> 0, parameter units).
        k: K of the polytope (>= 1). tau: the diameter multiplier (> 0).
    Returns: the box radius (float, parameter units).
    Raises: SparseFWError: non-positive init_norm, k or tau.
    """
    if not (math.isfinite(init_norm) and init_norm > 0):
        raise SparseFWError(f"the expected init norm must be > 0, got {init_norm!r}; a tensor "
                            "initialized to zeros needs an explicit radius")
    if int(k) < 1 or not (math.isfinite(tau) and tau > 0):
        raise SparseFWError(f"need K >= 1 and tau > 0, got K = {k}, tau = {tau}")
    return float(tau) * float(init_norm) / math.sqrt(int(k))
