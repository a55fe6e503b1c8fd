"""Sparsity patterns, saliency scores and budgeted selection (pure tensor functions).

Everything here works on a weight matrix ``W`` of shape ``(d_out, d_in)`` (rows = output
features, columns = input features, the ``nn.Linear`` convention) and returns boolean masks of
the same shape, ``True`` = weight kept.

One primitive, :func:`select`, picks the highest-scoring entries under a pattern's budget. The
baseline masks (magnitude, Wanda, RIA), the Frank-Wolfe linear minimization oracle (LMO) and the
rounding of a relaxed mask are all calls to it with different scores.

Sources: Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs", Eq. 1 and the
per-output comparison group); RIA (Zhang et al. 2024, "Plug-and-Play", Eq. 1 with a = 0.5);
SparseFW (arXiv 2510.13713, Sec. 3, the LMO over the convex hull of k-sparse masks).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import SparseFWError

PATTERN_HELP = "use 'unstructured', 'per-matrix' or N:M such as '2:4' or '4:8'"


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern.

    Attributes:
        kind: ``"unstructured"`` (k kept per output row: Wanda's per-output comparison group, with
            k = round((1-s) d_in), see :meth:`kept_per_row`), ``"per-matrix"``
            (k kept over the whole matrix) or ``"nm"`` (n kept in every group of m consecutive
            input columns).
        sparsity: fraction of weights removed, in [0, 1). For N:M it is ``1 - n/m``.
        n, m: the N:M numbers (``None`` otherwise).
    """

    kind: str
    sparsity: float
    n: int | None = None
    m: int | None = None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    def kept_per_row(self, d_in: int) -> int:
        """Kept entries per row, ``round((1 - sparsity) * d_in)`` (``n * d_in / m`` for N:M).

        This is the nearest count to the asked sparsity. Wanda's code (Sun et al. 2023,
        ``prune_wanda``) prunes ``int(sparsity * d_in)`` per row instead, i.e. keeps
        ``d_in - int(sparsity * d_in)``: one more whenever ``(1 - sparsity) * d_in`` has a fraction
        below 0.5 (60% of 576: 230.4, we keep 230, Wanda keeps 231). Every method here uses
        this same count, so comparisons between them are like for like.
        """
        if self.kind == "nm":
            return self.n * (d_in // self.m)
        return int(round((1.0 - self.sparsity) * d_in))

    def check_shape(self, shape: tuple[int, int], name: str = "weight") -> None:
        """Raise :class:`SparseFWError` if the pattern cannot apply to a ``(d_out, d_in)`` matrix."""
        if self.kind == "nm" and shape[1] % self.m != 0:
            raise SparseFWError(
                f"N:M pattern {self} needs the input dimension to be a multiple of {self.m}, "
                f"but {name} has d_in = {shape[1]}; choose another M or 'unstructured'")


def parse_pattern(pattern: str, sparsity: float | None = None) -> Pattern:
    """Parse a pattern name and check the sparsity.

    Args:
        pattern: ``"unstructured"``, ``"per-matrix"``, or ``"N:M"`` (e.g. ``"2:4"``).
        sparsity: fraction removed in [0, 1); ignored (derived) for N:M.
    Raises:
        SparseFWError: unknown pattern, N > M or N < 1, sparsity missing or outside [0, 1).
    """
    p = str(pattern).strip().lower()
    mt = re.fullmatch(r"(\d+):(\d+)", p)
    if mt:
        n, m = int(mt.group(1)), int(mt.group(2))
        if not (1 <= n < m):
            raise SparseFWError(f"N:M pattern '{pattern}' needs 1 <= N < M (e.g. 2:4)")
        return Pattern("nm", 1.0 - n / m, n, m)
    if p not in ("unstructured", "per-matrix"):
        raise SparseFWError(f"unknown sparsity pattern '{pattern}': {PATTERN_HELP}")
    if sparsity is None or not isinstance(sparsity, (int, float)) or math.isnan(sparsity) \
            or not (0.0 <= float(sparsity) < 1.0):
        raise SparseFWError(f"sparsity must be a number in [0, 1) (e.g. 0.5 for 50%), got {sparsity!r}")
    return Pattern(p, float(sparsity))


# ----------------------------------------------------------------------------------------------
# Saliency scores
# ----------------------------------------------------------------------------------------------
def magnitude_scores(W: torch.Tensor) -> torch.Tensor:
    """Magnitude saliency ``|W|``. W: (d_out, d_in) float -> (d_out, d_in) float."""
    return W.abs()


def wanda_scores(W: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """Wanda saliency ``|W_ij| * ||X_j||_2`` (Sun et al. 2023, Eq. 1).

    Args:
        W: (d_out, d_in) float weights.
        col_norms: (d_in,) float, the L2 norm of each input feature over all calibration tokens,
            ``sqrt(diag(G))``.
    Returns: (d_out, d_in) float32 scores.
    """
    return W.abs().float() * col_norms.float().unsqueeze(0)


def ria_scores(W: torch.Tensor, col_norms: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """RIA saliency ``(|W_ij|/sum_j|W_ij| + |W_ij|/sum_i|W_ij|) * ||X_j||_2^a`` (Zhang et al. 2024, Eq. 1).

    Args:
        W: (d_out, d_in) float weights; col_norms: (d_in,) float; a: activation exponent (0.5).
    Returns: (d_out, d_in) float32 scores.
    """
    A = W.abs().float()
    row = A.sum(dim=1, keepdim=True).clamp_min(1e-30)
    col = A.sum(dim=0, keepdim=True).clamp_min(1e-30)
    return (A / row + A / col) * col_norms.float().clamp_min(0).pow(a).unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# Budgeted selection
# ----------------------------------------------------------------------------------------------
def _rowwise_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of every row, on the scores' device (torch.topk; it
    was 1.5x faster than numpy's argpartition in the FW loop, docs/solver.md, and needs no host
    round trip). Among entries tied at the k-th value, which ones are kept is up to torch.topk.
    scores: (r, c) float, no NaN."""
    r, c = scores.shape
    out = torch.zeros((r, c), dtype=torch.bool, device=scores.device)
    if k <= 0:
        return out
    if k >= c:
        out[:] = True
        return out
    return out.scatter_(1, torch.topk(scores, k, dim=1, sorted=False).indices, True)


def group_rank(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Rank (0 = largest) of every entry within its group of m consecutive columns.

    Ties are broken by position (earlier column first), so ranks in a group are a permutation of
    0..m-1. Explicit pairwise comparisons (m*(m-1)/2 of them) are much faster than sorting for
    m = 4 (docs/solver.md). scores: (r, c) with c % m == 0 -> (r, c) int64.
    """
    r, c = scores.shape
    s = scores.reshape(r, c // m, m)
    rank = torch.zeros(s.shape, dtype=torch.int64, device=s.device)
    for a in range(m):
        for b in range(a + 1, m):
            a_wins = s[..., a] >= s[..., b]  # tie -> earlier column wins
            rank[..., b] += a_wins
            rank[..., a] += ~a_wins
    return rank.reshape(r, c)


def select(scores: torch.Tensor, pattern: Pattern, eligible: torch.Tensor | None = None,
           budget: torch.Tensor | int | None = None, positive_only: bool = False) -> torch.Tensor:
    """Select the highest-scoring entries within the pattern's budget.

    This is the LMO of SparseFW (scores = minus the gradient), the rounding step (scores = the
    relaxed mask) and the baseline pruning rule (scores = saliency).

    Args:
        scores: (d_out, d_in) float; larger = more wanted. Must be finite on eligible entries.
        pattern: the sparsity pattern.
        eligible: optional (d_out, d_in) bool; only these entries may be selected.
        budget: how many to select. ``None`` = the pattern's own budget (k per row, k per matrix,
            or n per group). Otherwise: unstructured, an int or a (d_out,) int tensor per row;
            per-matrix, an int; N:M, an int per group or a (d_out, d_in/m) int tensor.
        positive_only: select only entries with score > 0 (the per-matrix LMO of the paper
            keeps only negative gradients), so fewer than the budget may be chosen.
    Returns:
        (d_out, d_in) bool mask.
    Raises:
        SparseFWError: if an N:M pattern does not divide d_in.
    """
    d_out, d_in = scores.shape
    pattern.check_shape((d_out, d_in))
    s = scores.detach()
    if s.dtype not in (torch.float32, torch.float64):
        s = s.float()
    if eligible is not None or positive_only:
        s = s.clone()
        if eligible is not None:
            s[~eligible] = -math.inf
        if positive_only:
            s[s <= 0] = -math.inf
    if pattern.kind == "unstructured":
        k = pattern.kept_per_row(d_in) if budget is None else budget
        if isinstance(k, torch.Tensor) and k.numel() > 1 and not bool((k == k.flatten()[0]).all()):
            order = torch.argsort(s, dim=1, descending=True, stable=True)
            ranks = torch.empty_like(order)
            ranks.scatter_(1, order, torch.arange(d_in, device=s.device).expand(d_out, d_in).contiguous())
            out = ranks < k.view(-1, 1)
        else:
            k = int(k.flatten()[0]) if isinstance(k, torch.Tensor) else int(k)
            out = _rowwise_topk(s, k)
    elif pattern.kind == "per-matrix":
        k = int(round((1.0 - pattern.sparsity) * d_out * d_in)) if budget is None else int(budget)
        out = torch.zeros(d_out * d_in, dtype=torch.bool, device=s.device)
        if k > 0:
            idx = torch.topk(s.flatten(), min(k, d_out * d_in)).indices
            out[idx] = True
        out = out.view(d_out, d_in)
    else:
        m = pattern.m
        b = pattern.n if budget is None else budget
        rank = group_rank(s, m).view(d_out, d_in // m, m)
        if isinstance(b, torch.Tensor):
            b = b.view(d_out, d_in // m, 1)
        out = (rank < b).view(d_out, d_in)
    if eligible is not None or positive_only:
        out &= torch.isfinite(s)
    return out


def prune_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Baseline mask: keep the top-scoring weights under the pattern (magnitude / Wanda / RIA).

    Args: scores (d_out, d_in) saliency; pattern. Returns (d_out, d_in) bool, True = kept.
    """
    return select(scores, pattern)
