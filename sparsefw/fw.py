"""Frank-Wolfe over the convex hull of sparse masks for one layer (pure tensor functions).

Problem (SparseFW, arXiv 2510.13713, Eq. 2-3): for a layer with weight W (d_out, d_in) and
calibration inputs X (d_in, n), with the Gram matrix G = X X^T (d_in, d_in),

    min_M f(M) = ||(W ⊙ (1 - M)) X||_F^2 = sum_i r_i^T G r_i,   r = W ⊙ (1 - M),
    grad f(M) = -2 W ⊙ ((W ⊙ (1 - M)) G),

over the convex hull of binary masks M that meet the sparsity pattern. The FW iteration
(the paper's Algorithm 1) is M <- (1 - eta) M + eta V with V = LMO(grad f(M)), followed by a
rounding of the relaxed M back to a binary mask.

Implementation notes (measurements in docs/solver.md):
* alpha trick (paper Sec. 3.3): the alpha fraction of the warmstart's kept entries with the highest
  warmstart scores is fixed to 1 (mask F); FW runs over the remaining "free" budget only, with
  M = F + Z, Z supported on the free entries (compact (d_out, c) coordinates where every row has
  the same number of free entries).
* One dense product: Q0 = (W ⊙ (1 - M_warm)) G is the only d_out x d_in x d_in GEMM. The solver
  keeps P = (W ⊙ (Z - Z0)) G, so that (W ⊙ (1 - M)) G = Q0 - P, and updates it by the change of
  the iterate (:func:`gram_product`: a gather of rows of G when the change is sparse, a GEMM when
  not); the vertex product (W ⊙ (V - Z0)) G is updated from the product of whichever of the last
  two vertices is closer to V in each row (line-search FW zigzags, so V is often nearer V_{t-2}:
  at d_in 4096 the change falls from ~5.6% to ~3.7% of d_in, below the gather threshold).
  Candidate masks are evaluated from Q0 and the product of their difference to the warmstart,
  which is kept from the previous candidate and updated by the (sparse) change between the two;
  the swaps start from the final candidate's product.
* Rows are independent (unstructured, N:M): every row takes its own exact line search step
  eta_i = <W⊙D, (W⊙(1-M))G>_i / <W⊙D, (W⊙D)G>_i and stops when its FW gap is below tol times its
  own warmstart error; finished rows leave the iteration.
* The final mask goes through exact swap refinement (:mod:`sparsefw.swaps`; per-matrix: swaps
  within rows, so that every row and the matrix keep their counts).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .errors import SparseFWError
from .gram import all_finite, bag_rows, by_row_blocks, row_diffs, row_matmul, row_sums64
from .masks import Pattern, group_rank, select
from .swaps import ROW_TILE, swap_refine

STEP_RULES = ("pairwise", "linesearch", "harmonic")
FIX_MODES = ("row", "group")


# ----------------------------------------------------------------------------------------------
# Objective and gradient
# ----------------------------------------------------------------------------------------------
def reconstruction_error(W: torch.Tensor, G: torch.Tensor, M: torch.Tensor) -> float:
    """Pruning error f(M) = ||(W ⊙ (1-M)) X||_F^2 = sum_i r_i^T G r_i (SparseFW Eq. 2).

    Args:
        W: (d_out, d_in) float weights. G: (d_in, d_in) float Gram matrix X X^T.
        M: (d_out, d_in) bool or float mask in [0, 1] (1 = kept).
    Returns:
        f(M) as a Python float, in squared activation units summed over all calibration tokens.
    """
    R = W.float() * (1.0 - M.float())
    return float((R @ G.float()).mul_(R).sum(dtype=torch.float64))


def weight_error(W: torch.Tensor, G: torch.Tensor, W_hat: torch.Tensor) -> float:
    """Output error of replacing W by W_hat: ||(W - W_hat) X||_F^2 = sum_i r_i^T G r_i, r = W - W_hat.

    Covers pruning with weight updates (SparseGPT, reconstruction); with W_hat = W ⊙ M it equals
    :func:`reconstruction_error`. Shapes (d_out, d_in) and (d_in, d_in); returns a float.
    """
    R = W.float() - W_hat.float()
    return float((R @ G.float()).mul_(R).sum(dtype=torch.float64))


def row_errors(W: torch.Tensor, G: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Per-row pruning errors r_i^T G r_i, r = W ⊙ (1-M): (d_out,) float64. f(M) is their sum."""
    R = W.float() * (1.0 - M.float())
    return (R @ G.float()).mul_(R).sum(dim=1, dtype=torch.float64)


def dense_output_norm(W: torch.Tensor, G: torch.Tensor) -> float:
    """||W X||_F^2 = sum_i w_i^T G w_i, the denominator of the relative error. Shapes as above."""
    W = W.float()
    return float((W @ G.float()).mul_(W).sum(dtype=torch.float64))


def relative_error(W: torch.Tensor, G: torch.Tensor, M: torch.Tensor) -> float:
    """Relative pruning error f(M) / ||W X||_F^2 (dimensionless; 0 = lossless, 1 = all pruned)."""
    return reconstruction_error(W, G, M) / max(dense_output_norm(W, G), 1e-300)


def gradient(W: torch.Tensor, G: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """grad f(M) = -2 W ⊙ ((W ⊙ (1-M)) G) (SparseFW Eq. 3). Shapes (d_out, d_in), float32."""
    W = W.float()
    return -2.0 * W * ((W * (1.0 - M.float())) @ G.float())


# ----------------------------------------------------------------------------------------------
# The alpha trick: fixed entries and free budgets
# ----------------------------------------------------------------------------------------------
def split_fixed(warm_mask: torch.Tensor, warm_scores: torch.Tensor, pattern: Pattern, alpha: float,
                fix: str = "row") -> tuple[torch.Tensor, torch.Tensor | int]:
    """Fix the alpha fraction of the warmstart's kept entries with the highest scores (Sec. 3.3).

    Args:
        warm_mask: (d_out, d_in) bool warmstart mask (meets ``pattern``).
        warm_scores: (d_out, d_in) float warmstart saliency (Wanda or RIA scores).
        pattern: sparsity pattern. alpha: fraction in [0, 1].
        fix: ``"row"`` fixes round(alpha*k) entries per row (per matrix for ``per-matrix``);
            ``"group"`` (N:M only) fixes floor(alpha*n) entries in every group of m.
    Returns:
        (fixed, free_budget): fixed (d_out, d_in) bool; free_budget = how many entries FW still
        chooses: an int (per row, per matrix or per group), or a (d_out, d_in/m) int64 tensor of
        per-group budgets for N:M with ``fix="row"``.
    Raises:
        SparseFWError: alpha outside [0, 1] or unknown ``fix``.
    """
    if not (0.0 <= alpha <= 1.0) or math.isnan(alpha):
        raise SparseFWError(f"alpha must be in [0, 1] (fraction of warmstart weights fixed), got {alpha}")
    if fix not in FIX_MODES:
        raise SparseFWError(f"unknown fix mode '{fix}': use 'row' or 'group'")
    d_out, d_in = warm_mask.shape
    if pattern.kind == "nm" and fix == "group":
        nfix = int(math.floor(alpha * pattern.n + 1e-9))
        sub = Pattern("nm", pattern.sparsity, max(nfix, 0), pattern.m)
        fixed = select(warm_scores, sub, eligible=warm_mask, budget=nfix) if nfix > 0 else \
            torch.zeros_like(warm_mask)
        return fixed, pattern.n - nfix
    if pattern.kind == "per-matrix":
        kept = int(warm_mask.sum())
        nfix = int(round(alpha * kept))
        fixed = select(warm_scores, pattern, eligible=warm_mask, budget=nfix)
        return fixed, kept - nfix
    k = pattern.kept_per_row(d_in)
    nfix = int(round(alpha * k))
    rowpat = Pattern("unstructured", pattern.sparsity)
    fixed = select(warm_scores, rowpat, eligible=warm_mask, budget=nfix)
    if pattern.kind == "nm":
        per_group = fixed.view(d_out, d_in // pattern.m, pattern.m).sum(-1)
        return fixed, pattern.n - per_group
    return fixed, k - nfix


def lmo(grad: torch.Tensor, pattern: Pattern, free: torch.Tensor, budget) -> torch.Tensor:
    """Linear minimization oracle over the free entries (SparseFW Sec. 3.2).

    Puts 1 on the ``budget`` free entries with the most negative gradient (per row, per group of
    m for N:M, or over the matrix; for ``per-matrix`` only negative entries, as in the paper).

    Args:
        grad: (d_out, d_in) float gradient of f at the current M.
        pattern: sparsity pattern. free: (d_out, d_in) bool entries FW may choose.
        budget: as returned by :func:`split_fixed`.
    Returns: (d_out, d_in) bool vertex V_z (zero on fixed entries).
    """
    return select(-grad, pattern, eligible=free, budget=budget,
                  positive_only=pattern.kind == "per-matrix")


def fw_update(M: torch.Tensor, V: torch.Tensor, eta: float) -> torch.Tensor:
    """The Frank-Wolfe step M <- (1 - eta) M + eta V, in place (SparseFW Algorithm 1, line 5).

    Args:
        M: float relaxed mask (any shape), updated in place. V: bool or float vertex (same shape).
        eta: step size in [0, 1].
    Returns: M.
    Raises: SparseFWError if eta is outside [0, 1].
    """
    if not (0.0 <= eta <= 1.0):
        raise SparseFWError(f"FW step size must be in [0, 1], got {eta}")
    return M.mul_(1.0 - eta).add_(V.to(M.dtype), alpha=eta)


def round_mask(Z: torch.Tensor, tiebreak: torch.Tensor, pattern: Pattern, free: torch.Tensor,
               budget) -> torch.Tensor:
    """Round a relaxed mask: keep the budget's largest Z among free entries (per row / group).

    Ties in Z (common: many entries sit at exactly 0 or at the same value) are broken by
    ``tiebreak`` (the warmstart scores), so a converged-to-warmstart Z rounds to the warmstart.

    Args:
        Z: (d_out, d_in) float relaxed mask on the free entries, in [0, 1].
        tiebreak: (d_out, d_in) float (any scale). pattern, free, budget: as in :func:`lmo`.
    Returns: (d_out, d_in) bool.
    """
    return select(_rounding_key(Z, tiebreak), pattern, eligible=free, budget=budget)


def _rounding_key(Z: torch.Tensor, tiebreak: torch.Tensor) -> torch.Tensor:
    """Z plus the tie-break scaled to at most 1e-9 per row, in float64 so the tie-break stays below
    any real difference in Z (per row, so that a row's key does not depend on the other rows).
    Shapes equal (r, c); returns float64."""
    t = tiebreak.double()
    if t.numel() == 0:
        return Z.double()
    scale = t.abs().amax(dim=-1, keepdim=True).clamp_min(1e-300)
    return t.div_(scale).mul_(1e-9).add_(Z)      # in place: one float64 buffer


# ----------------------------------------------------------------------------------------------
# Products with G: dense GEMM or gather, whichever is cheaper for the density
# ----------------------------------------------------------------------------------------------
DENSE_ABOVE = 0.2
"""Fraction of nonzeros in W ⊙ D above which (W ⊙ D) G is one dense GEMM instead of a gather of
rows of G (:func:`sparsefw.gram.bag_rows`, column panel by column panel). The GEMM costs
2 * r * d_in^2 flops at BLAS speed; the paneled gather nnz * d_in cached reads. Measured on one
core (2048 rows, d_in 2048-8192): the gather is 1.6-4x faster than the GEMM up to 20% density and
about as fast at 30%; ``scripts/bench_solver.py --products`` times both per width and density
(docs/solver.md, "Sparse products")."""


def gram_product(E: torch.Tensor, G: torch.Tensor, cols: torch.Tensor | None = None,
                 dense_above: float = DENSE_ABOVE, full: bool = False) -> torch.Tensor:
    """E_full G, read at compact columns: the product update of the FW solver.

    Every row takes the cheaper path for its own density (a row's result never depends on the
    other rows, so row blocks give the same bits): a row with more than ``dense_above * d_in``
    nonzeros goes through one dense GEMM (:func:`row_matmul`) with the other dense rows, the others
    through a gather of rows of G (``embedding_bag``).

    Args:
        E: (r, c) float32, the values of W ⊙ D at the compact coordinates (mostly zeros after the
            first iterations). cols: (r, c) int64, the global column (0..d_in-1) of every compact
            coordinate, or ``None`` when E is full width (c = d_in).
        G: (d_in, d_in) float32 Gram matrix.
        dense_above: row density nnz / d_in above which the row goes through the GEMM.
        full: return the product on all d_in columns instead of the compact ones.
    Returns:
        (r, c) float32: entry (i, a) = sum_j E_full[i, j] G[j, cols[i, a]]; with ``full``,
        (r, d_in) float32 E_full G.
    """
    r, c = E.shape
    d_in = G.shape[0]
    nz = E != 0
    dense = row_diffs(E) > dense_above * d_in
    if bool(dense.all()):                     # one GEMM, no second (r, d_in) buffer
        Ef = E if cols is None else torch.zeros(r, d_in, dtype=E.dtype, device=E.device).scatter_(1, cols, E)
        H = row_matmul(Ef, G)
        del Ef
        return H if cols is None or full else H.gather(1, cols)
    sparse = ~dense
    H = None if bool(sparse.all()) else torch.zeros(r, d_in, dtype=torch.float32, device=E.device)
    if H is not None:
        Ed = E[dense]
        Ef = Ed if cols is None else torch.zeros(Ed.shape[0], d_in, dtype=E.dtype, device=E.device) \
            .scatter_(1, cols[dense], Ed)
        H[dense] = row_matmul(Ef, G)
        del Ed, Ef
    # row i of the product = sum over its nonzeros j of E_ij G[j, :]: one bag per sparse row
    Es, nzs = (E, nz) if H is None else (E[sparse], nz[sparse])
    rr, cc = nzs.nonzero(as_tuple=True)
    g = cc if cols is None else (cols if H is None else cols[sparse])[rr, cc]
    bag = bag_rows(rr, g, G, Es[rr, cc], Es.shape[0])
    del rr, cc, g, nzs
    if H is None:
        H = bag
    else:
        H[sparse] = bag
        del bag
    return H if cols is None or full else H.gather(1, cols)


# ----------------------------------------------------------------------------------------------
# Coordinates of the free entries
# ----------------------------------------------------------------------------------------------
_ONE = 1.0 - 1e-6  # relaxed entries within 1e-6 of 1 count (and are snapped) as 1


class _CompactView:
    """Coordinates of the free entries. For unstructured (row fixing) and N:M (group fixing)
    every row has the same number c of free entries, so all per-iteration work runs on compact
    (r, c) matrices (c = d_in - round(alpha k)) and the LMO is one top-k (or one group ranking).
    Other cases (per-matrix, N:M with row fixing) use the full matrix (``idx`` is None) and the
    generic :func:`select`. ``subset`` restricts the view to the rows still iterating."""

    def __init__(self, shape, free, pattern, budget, idx=None, kind="identity", m_c=0, b_c=0):
        self.shape, self.free, self.pattern, self.budget = shape, free, pattern, budget
        self.idx, self.kind, self.m_c, self.b_c = idx, kind, m_c, b_c

    @classmethod
    def build(cls, free, pattern, budget, fix):
        counts = free.sum(1)
        const = int(counts.min()) == int(counts.max())
        shape = tuple(free.shape)
        if const and pattern.kind == "unstructured" and isinstance(budget, int):
            return cls(shape, free, pattern, budget, free.nonzero(as_tuple=True)[1].view(shape[0], -1), "rows")
        if const and pattern.kind == "nm" and fix == "group" and isinstance(budget, int):
            idx = free.nonzero(as_tuple=True)[1].view(shape[0], -1)
            m_c = pattern.m - (pattern.n - budget)  # free entries per group
            return cls(shape, free, pattern, budget, idx, "groups", m_c, budget)
        return cls(shape, free, pattern, budget)

    @property
    def width(self) -> int:
        return self.shape[1] if self.idx is None else self.idx.shape[1]

    def subset(self, keep: torch.Tensor) -> "_CompactView":
        """The view of the rows ``keep`` (bool over the current rows)."""
        b = self.budget[keep] if isinstance(self.budget, torch.Tensor) else self.budget
        idx = None if self.idx is None else self.idx[keep]
        n = int(keep.sum())
        return _CompactView((n, self.shape[1]), self.free[keep], self.pattern, b, idx, self.kind,
                            self.m_c, self.b_c)

    def gather(self, T):
        return T if self.idx is None else torch.gather(T, 1, self.idx)

    def scatter(self, Tc):
        if self.idx is None:
            return Tc
        out = torch.zeros(self.shape, dtype=Tc.dtype, device=Tc.device)
        return out.scatter_(1, self.idx, Tc)

    def best(self, scores, eligible=None, positive_only=False):
        """Compact bool: the free budget's best ``scores`` (per row, group or matrix)."""
        r, c = scores.shape
        if self.idx is None:
            elig = self.free if eligible is None else self.free & eligible
            return select(scores, self.pattern, eligible=elig, budget=self.budget, positive_only=positive_only)
        if eligible is not None:
            scores = scores.masked_fill(~eligible, -math.inf)
        if self.kind == "rows":
            k = self.budget
            if k <= 0:
                return torch.zeros(r, c, dtype=torch.bool, device=scores.device)
            if k >= c:
                return torch.ones(r, c, dtype=torch.bool, device=scores.device)
            local = torch.topk(scores, k, dim=1, sorted=False).indices
            return torch.zeros(r, c, dtype=torch.bool, device=scores.device).scatter_(1, local, True)
        return group_rank(scores, self.m_c) < self.b_c

    def lmo(self, sc):
        """FW vertex (see :func:`lmo`) given sc = W ⊙ Q = -grad/2 on the compact coordinates."""
        return self.best(sc, positive_only=self.pattern.kind == "per-matrix")

    def away(self, sc, Zc):
        """Away vertex of pairwise FW: the vertex of the smallest face containing Z (entries at 1
        stay 1, entries at 0 stay 0) with the largest gradient, i.e. the smallest sc among the
        fractional entries (Lacoste-Julien & Jaggi 2015, Algorithm 2, face-based as in Garber &
        Meshi 2016)."""
        big = torch.finfo(sc.dtype).max
        return self.best(torch.where(Zc >= _ONE, big, -sc), eligible=Zc > 0)

    def round(self, Zc, tiebreak_c):
        """Rounded free part (compact bool): the budget's largest Z, ties by ``tiebreak_c``."""
        return self.best(_rounding_key(Zc, tiebreak_c))


# ----------------------------------------------------------------------------------------------
# The solver
# ----------------------------------------------------------------------------------------------
@dataclass
class FWResult:
    """Output of :func:`fw_solve`.

    mask: (d_out, d_in) bool final mask (per row, the best of the warmstart and the rounded
    iterates). error_warmstart / error_final: relative errors f(M)/||WX||^2 of the warmstart and
    final masks. error_rounded: relative error of the rounded last iterate (before the safeguard).
    relaxed_error: relative error of the relaxed last iterate.
    iterations: FW iterations of the row that ran longest; row_iterations: (d_out,) int64 per row
    (per-matrix: the same for every row); at_cap: rows that stopped at the iteration cap, not at
    the gap tolerance. fw_gap: largest remaining FW gap <-grad, V - M> of a row, relative to that
    row's warmstart error (per-matrix: of the matrix). chosen: ``"fw"``, ``"warmstart"`` or
    ``"fw in a/b rows"``. seconds: wall time; setup_seconds: warmstart, alpha fixing and the first
    products; loop_seconds: the FW iterations; swap_seconds: the swap refinement; the rest of
    ``seconds`` is rounding and the safeguard.
    history: list of (iteration, relative relaxed error, relative rounded error or None).
    error_before_swaps: relative error of the mask before the swap refinement; swaps / swap_rounds:
    pairs swapped and rounds run by :func:`sparsefw.swaps.swap_refine`.
    """

    mask: torch.Tensor
    error_warmstart: float
    error_final: float
    error_rounded: float
    relaxed_error: float
    iterations: int
    fw_gap: float
    chosen: str
    seconds: float
    loop_seconds: float = 0.0
    setup_seconds: float = 0.0
    swap_seconds: float = 0.0
    history: list = field(default_factory=list)
    row_iterations: torch.Tensor | None = None
    at_cap: int = 0
    error_before_swaps: float = 0.0
    swaps: int = 0
    swap_rounds: int = 0


class _Rows:
    """The FW state of the rows still iterating, on compact coordinates (r rows, c columns):
    W (weights), Z0 (warmstart), Z (relaxed mask), Q0 = ((W ⊙ (1 - M_warm)) G) and
    P = ((W ⊙ (Z - Z0)) G), so that Q = (W ⊙ (1 - M)) G = Q0 - P; for the vanilla FW rules also
    S = ((W ⊙ (V - Z0)) G) of the last vertex V, and S2, V2 of the vertex before it. ``ids`` are the rows' indices in the layer, ``fw``
    their warmstart errors (per-matrix: one, of the matrix)."""

    def __init__(self, **t):
        self.__dict__.update(t)

    def keep(self, keep: torch.Tensor) -> None:
        for k, v in list(self.__dict__.items()):
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == keep.shape[0]:
                setattr(self, k, v[keep])
        self.view = self.view.subset(keep)


def _check_solver_args(W, G, pattern, step, tol, iterations):
    if step not in STEP_RULES:
        raise SparseFWError(f"unknown step rule '{step}': use one of {', '.join(STEP_RULES)}")
    if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise SparseFWError(f"tol must be a number >= 0 (FW gap relative to the warmstart error, "
                            f"e.g. 0.01; 0 runs every row to the iteration cap), got {tol!r}")
    if not isinstance(iterations, int) or iterations < 0:
        raise SparseFWError(f"iterations must be an integer >= 0, got {iterations!r}")
    if W.dim() != 2 or G.shape != (W.shape[1], W.shape[1]):
        raise SparseFWError(f"shape mismatch: W {tuple(W.shape)} needs G of shape "
                            f"({W.shape[1]}, {W.shape[1]}), got {tuple(G.shape)}")
    pattern.check_shape(tuple(W.shape))
    W = W.detach().float().contiguous()
    G = G.detach().float().contiguous()
    if not all_finite(W, G):
        raise SparseFWError("weights or Gram matrix contain NaN/Inf; check the model and calibration data")
    return W, G


def _chosen(mask: torch.Tensor, warm: torch.Tensor, per_row: bool) -> str:
    """FWResult.chosen: ``"warmstart"`` if no row changed, ``"fw"`` if every row did (or the
    per-matrix mask changed), else ``"fw in a/b rows"``."""
    d_out = mask.shape[0]
    changed = int((mask != warm).any(dim=1).sum())
    if changed == 0:
        return "warmstart"
    return "fw" if not per_row or changed == d_out else f"fw in {changed}/{d_out} rows"


def _warmstart_and_swaps(W, G, warm, pattern, t0, dense_norm, swaps, working_set) -> FWResult:
    """:func:`fw_solve` with ``iterations=0``: the warmstart mask refined by the swaps, without
    the FW set-up (alpha fixing, compact coordinates), which would not change the result."""
    d_out = W.shape[0]
    R0 = W * ~warm
    Q0 = row_matmul(R0, G)                                   # the one d_out x d_in x d_in GEMM
    f_rows = row_sums64(R0, Q0)
    del R0
    denom = max(dense_output_norm(W, G) if dense_norm is None else float(dense_norm), 1e-300)
    f_warm = float(f_rows.sum()) / denom
    t_swaps = time.perf_counter()
    mask, f_final, swap = warm, f_warm, None
    if swaps > 0 and bool(f_rows.gt(0).any()):
        swap = swap_refine(W, G, warm, _swap_pattern(pattern), Q=Q0, max_rounds=swaps, working_set=working_set)
        mask, f_final = swap.mask, float((f_rows + swap.delta).sum()) / denom
    t1 = time.perf_counter()
    return FWResult(mask=mask, error_warmstart=f_warm, error_final=f_final, error_rounded=f_warm,
                    relaxed_error=f_warm, iterations=0, fw_gap=0.0, chosen=_chosen(mask, warm, True),
                    seconds=t1 - t0, loop_seconds=0.0, setup_seconds=t_swaps - t0, swap_seconds=t1 - t_swaps,
                    history=[], row_iterations=torch.zeros(d_out, dtype=torch.int64, device=W.device), at_cap=0,
                    error_before_swaps=f_warm, swaps=swap.swaps if swap else 0,
                    swap_rounds=swap.iterations if swap else 0)


def _swap_pattern(pattern: Pattern) -> Pattern:
    """The pattern the swaps keep: the pattern itself, or for ``per-matrix`` swaps within rows
    (every row keeps its count, so the matrix keeps its count)."""
    return Pattern("unstructured", pattern.sparsity) if pattern.kind == "per-matrix" else pattern


def _relaxed(W, Z, Q0, P=None):
    """The row terms of the relaxed error W ⊙ (1 - Z) ⊙ Q, with Q = Q0 - P (or Q0 itself)."""
    return W * (1.0 - Z) * (Q0 if P is None else Q0 - P)


class _FWRun:
    """One :func:`fw_solve` with FW iterations: the set-up (alpha fixing, compact coordinates, the
    one dense product), the iterations, the rounding and the result. Every row (per-matrix: the
    matrix, one segment) keeps its best candidate mask, the warmstart included."""

    def __init__(self, W, G, warm_scores, warm, pattern, alpha, iterations, step, tol, fix, incremental,
                 dense_above, dense_norm, record_at, round_at, record_rounded):
        self.W, self.G, self.warm, self.pattern = W, G, warm, pattern
        self.iterations, self.step, self.tol = iterations, step, tol
        self.incremental, self.dense_above = incremental, dense_above
        self.record_at, self.record_rounded = record_at, record_rounded
        self.per_row = pattern.kind != "per-matrix"
        self.pairwise = step == "pairwise" and self.per_row
        self.fixed, budget = split_fixed(warm, warm_scores, pattern, alpha, fix)
        self.view = view = _CompactView.build(~self.fixed, pattern, budget, fix)
        d_out, dev = W.shape[0], W.device
        R0 = W * ~warm                                       # residual of the warmstart
        self.Q0 = row_matmul(R0, G)                          # the one d_out x d_in x d_in GEMM
        self.f_warm_rows = row_sums64(R0, self.Q0)
        self.denom = max(dense_output_norm(W, G) if dense_norm is None else float(dense_norm), 1e-300)
        del R0
        Wc = view.gather(W * ~self.fixed)                    # zero on fixed entries (identity view)
        tie = view.gather(warm_scores.float())
        Z0 = view.gather((warm & ~self.fixed).float())
        f_warm = self.f_warm_rows if self.per_row else self.f_warm_rows.sum().view(1)   # per segment
        self.st = st = _Rows(ids=torch.arange(d_out, device=dev), W=Wc, Z0=Z0, Z=Z0.clone(), Q0=view.gather(self.Q0),
                             P=torch.zeros_like(Wc), fw=f_warm, view=view)
        if not self.pairwise:
            st.S, st.V = torch.zeros_like(Wc), Z0.bool()         # vertices kept as bool (1 byte an entry)
            st.S2, st.V2 = torch.zeros_like(Wc), st.V.clone()    # the vertex before V, its product
        self.best_err = f_warm.clone()
        self.best_free = Z0.bool()
        # the last candidate evaluated in every row (compact bool) and, on all d_in columns, the
        # product (W ⊙ (M_warm - M_cand)) G: the next candidate's product is this one updated by
        # the (sparse) change between the two candidates, and the swaps start from it
        self.cand = Z0.bool()
        self.cand_H = torch.zeros(d_out, W.shape[1], dtype=torch.float32, device=dev)
        self.full = _Rows(ids=st.ids, W=Wc, Z0=Z0, Q0=st.Q0, fw=f_warm, view=view, tie=tie)  # all rows, for rounding
        n_seg = d_out if self.per_row else 1
        self.Z_out = st.Z.clone()                            # final relaxed Z of every row
        self.f_relaxed = st.fw.clone()                       # relaxed errors, per segment
        self.gap_rel = torch.zeros(n_seg, dtype=torch.float64, device=dev)
        self.row_iters = torch.full((n_seg,), iterations, dtype=torch.int64, device=dev)
        self.round_at = set(round_at) if round_at is not None else \
            {2 ** j for j in range(0, 20) if 2 ** j <= iterations}
        self.history: list = []
        self.trivial = view.width == 0 or not bool(st.fw.gt(0).any())
        self.steps = 0
        self.live = torch.ones(st.W.shape[0] if self.per_row else 1, dtype=torch.bool, device=dev)

    def seg_sum(self, fn, *T):
        """Per-row float64 sums of ``fn(*T)`` (per-matrix: one sum); per row, block by block of
        rows (:func:`sparsefw.gram.by_row_blocks`: the same bits, the temporaries in cache)."""
        if self.per_row:
            return by_row_blocks(lambda *t: fn(*t).sum(1, dtype=torch.float64), *T)
        return fn(*T).sum(dtype=torch.float64).view(1)

    def product(self, E, cols, dense=False):
        return gram_product(E, self.G, cols, 0.0 if dense or not self.incremental else self.dense_above)

    def evaluate(self, rows: _Rows, Mc: torch.Tensor) -> torch.Tensor:
        """Errors of candidate free masks Mc for ``rows``: f = f_warm + 2 <d, Q0> + d^T G d with
        the sparse change d = W ⊙ (Z0 - Mc) of the residual. d G is the previous candidate's
        product plus the product of the change between the two candidates (most rows round to
        nearly the same mask twice), so a candidate rarely costs a dense GEMM."""
        ids = rows.ids
        warm = rows.Z0.bool()
        # a row whose candidate is closer to the warmstart than to the last candidate starts over
        # from the warmstart, whose product is 0 (at iteration 1 most rows round back to it)
        restart = row_diffs(Mc, warm) < row_diffs(Mc, self.cand[ids])
        if bool(restart.any()):
            self.cand_H[ids[restart]] = 0.0
            self.cand[ids[restart]] = warm[restart]
        change = rows.W * (self.cand[ids].float() - Mc.float())
        self.cand_H.index_add_(0, ids, gram_product(change, self.G, rows.view.idx, self.dense_above, full=True))
        self.cand[ids] = Mc
        dG = self.cand_H.index_select(0, ids)
        dG = dG if rows.view.idx is None else dG.gather(1, rows.view.idx)
        return rows.fw + self.seg_sum(lambda W, Z0, M, Q0, dG: W * (Z0 - M.float()) * (2.0 * Q0 + dG),
                                      rows.W, rows.Z0, Mc, rows.Q0, dG)

    def keep_better(self, rows: _Rows, Mc: torch.Tensor):
        e = self.evaluate(rows, Mc)
        if self.per_row:
            better = e < self.best_err[rows.ids]
            ids = rows.ids[better]
            self.best_err[ids] = e[better]
            self.best_free[ids] = Mc[better]
        elif bool(e[0] < self.best_err[0]):
            self.best_err[0], self.best_free = e[0], Mc
        return e

    def run(self) -> None:
        """The FW iterations (each row stops at its gap tolerance or the cap)."""
        for it in range(1, self.iterations + 1):
            if self.trivial:
                self.row_iters.zero_()
                break
            if self.iterate(it):
                break

    def iterate(self, it: int) -> bool:
        """One FW iteration of the rows still live; True when every row has finished."""
        st, dev = self.st, self.W.device
        Q = st.Q0 - st.P
        sc = st.W * Q                                        # -grad / 2 on the free coordinates
        V = st.view.lmo(sc).float()
        gap = 2.0 * self.seg_sum(lambda sc, V, Z: sc * (V - Z), sc, V, st.Z)
        finished = self.live & (gap <= self.tol * st.fw)
        gid = st.ids if self.per_row else torch.zeros(1, dtype=torch.int64, device=dev)
        self.gap_rel[gid] = gap / st.fw.clamp_min(1e-300)
        if bool(finished.any()):
            live = self.live
            self.row_iters[gid[finished]] = it - 1
            live &= ~finished
            if not bool(live.any()):
                return True
            if self.per_row and int((~live).sum()) >= max(1, live.numel() // 10):  # drop finished rows
                self.Z_out[st.ids[~live]] = st.Z[~live]
                self.f_relaxed[st.ids[~live]] = self.seg_sum(_relaxed, st.W, st.Z, Q)[~live]
                sc, V = sc[live], V[live]
                st.keep(live)
                self.live = torch.ones(st.W.shape[0], dtype=torch.bool, device=dev)
        self._step(it, sc, V)
        self.steps = it
        er = None
        if it in self.round_at or (it in self.record_at and self.record_rounded):
            er = self.keep_better(st, st.view.round(st.Z, self.full.tie[st.ids]))
        if it in self.record_at:
            self._record(it, er)
        return False

    def _step(self, it: int, sc, V) -> None:
        """Direction, step size (exact line search, or 2/(t+2)) and the update of Z and P."""
        st = self.st
        if self.pairwise:
            D = V - st.view.away(sc, st.Z).float()
            gmax = torch.minimum(torch.where(D > 0, 1.0 - st.Z, 2.0).amin(1),
                                 torch.where(D < 0, st.Z, 2.0).amin(1)).double().clamp_max(1.0)
            E = st.W * D
            H = self.product(E, st.view.idx)
        else:
            D = V - st.Z
            E = st.W * D
            if self.incremental and it == 1 and self.per_row:
                # S = (W ⊙ (V - Z0)) G, on all columns: the first candidate rounds to V in every
                # row whose step exceeds 1/2, so V becomes the last candidate, with this product
                Hv = gram_product(st.W * (V - st.V.float()), self.G, st.view.idx, self.dense_above, full=True)
                st.S = Hv.clone() if st.view.idx is None else Hv.gather(1, st.view.idx)
                self.cand_H[st.ids] = Hv.neg_()
                self.cand[st.ids] = V.bool()
                del Hv
            elif self.incremental:
                # S = (W ⊙ (V - Z0)) G from the product of whichever of the last two vertices is
                # closer to V in each row (line-search FW zigzags: V is often nearer V_{t-2})
                two = (row_diffs(V, st.V2) < row_diffs(V, st.V)).unsqueeze(1)
                Ev = torch.where(two, st.V2, st.V).float().neg_().add_(V).mul_(st.W)  # W ⊙ (V - base)
                S = torch.where(two, st.S2, st.S, out=st.S2)     # the old S2 is not needed any more
                S.add_(self.product(Ev, st.view.idx))
                st.S2, st.V2, st.S = st.S, st.V, S
                del Ev
            if self.incremental:
                st.V = V.bool()
                H = st.S - st.P                              # (W ⊙ (V - Z)) G
            else:
                H = self.product(E, st.view.idx, dense=True)
            gmax = torch.ones(st.W.shape[0] if self.per_row else 1, dtype=torch.float64, device=self.W.device)
        if self.step == "harmonic":
            eta = torch.full_like(gmax, 2.0 / (it + 1))
        else:
            num, den = self.seg_sum(torch.mul, sc, D), self.seg_sum(torch.mul, E, H)
            eta = torch.where(den > 0, (num / den.clamp_min(1e-300)).clamp(min=0.0),
                              torch.where(num > 0, 1.0, 0.0))
            eta = torch.minimum(eta, gmax)
        eta = torch.where(self.live, eta, 0.0).float().view(-1, 1)
        st.Z.add_(eta * D)
        if self.pairwise:                                    # entries that reached a bound sit on it
            st.Z.clamp_(0.0, 1.0).masked_fill_(st.Z >= _ONE, 1.0)
        if self.incremental:
            st.P.add_(eta * H)
        else:
            st.P = self.product(st.W * (st.Z - st.Z0), st.view.idx, dense=True)

    def _record(self, it: int, er) -> None:
        st = self.st
        fr = self.f_relaxed.clone()
        fr[st.ids if self.per_row else 0] = self.seg_sum(_relaxed, st.W, st.Z, st.Q0, st.P)
        rr = None
        if self.record_rounded:
            ee = self.best_err.clone()
            ee[st.ids if self.per_row else 0] = er
            rr = float(ee.sum()) / self.denom
        self.history.append((it, float(fr.sum()) / self.denom, rr))

    def finish(self):
        """The relaxed errors, the rounded last iterate as a candidate, and the best mask.
        Returns (mask, f_round per segment, at_cap)."""
        st = self.st
        if not self.trivial:
            self.Z_out[st.ids] = st.Z
            self.f_relaxed[st.ids if self.per_row else 0] = self.seg_sum(_relaxed, st.W, st.Z, st.Q0, st.P)
        if self.per_row:
            self.row_iters[st.ids[self.live]] = self.steps
        if self.steps > 0:                                   # the last iterate of every row, rounded
            f_round = self.keep_better(self.full, self.full.view.round(self.Z_out, self.full.tie))
        else:                                                # no iteration: the warmstart itself
            f_round = self.best_err.clone()
        at_cap = int((self.row_iters >= self.iterations).sum()) if self.iterations > 0 and not self.trivial else 0
        mask = self.fixed | self.view.scatter(self.best_free)
        # the iteration state is not needed any more: free it before the swaps allocate theirs
        self.st = self.Z_out = self.fixed = None
        self.full = _Rows(W=self.full.W, view=self.view)
        return mask, f_round, at_cap

    def swap(self, mask, swaps: int, working_set: int):
        """Exact swap refinement of the rounded mask; returns (mask, SwapResult or None) and adds
        the swaps' change to the best errors."""
        if swaps <= 0 or (self.per_row and self.trivial):
            return mask, None
        if self.per_row:     # (W ⊙ (1 - mask)) G = Q0 + (W ⊙ (warm - mask)) G, from the last candidate's product
            change = self.full.W * (self.cand.float() - self.best_free.float())
            Qm = self.cand_H.add_(gram_product(change, self.G, self.view.idx, self.dense_above, full=True))
            Qm.add_(self.Q0)
            self.cand_H = self.Q0 = self.full = change = None
            res = swap_refine(self.W, self.G, mask, self.pattern, Q=Qm, max_rounds=swaps, working_set=working_set,
                              overwrite_q=True)
            self.best_err = self.best_err + res.delta
        else:
            res = swap_refine(self.W, self.G, mask, _swap_pattern(self.pattern), max_rounds=swaps,
                              working_set=working_set)
            self.best_err = self.best_err + res.delta.sum()
        return res.mask, res


def fw_solve(W: torch.Tensor, G: torch.Tensor, warm_scores: torch.Tensor, pattern: Pattern,
             alpha: float = 0.9, iterations: int = 100, step: str = "linesearch",
             tol: float = 1e-2, fix: str = "row", record_at=(), round_at=None,
             record_rounded: bool = False, incremental: bool = True,
             dense_above: float = DENSE_ABOVE, dense_norm: float | None = None,
             swaps: int = 50, working_set: int = 8) -> FWResult:
    """SparseFW mask for one layer: warmstart, alpha trick, FW iterations, rounding, swaps.

    Algorithm 1 of arXiv 2510.13713 with the alpha trick (Sec. 3.3). Our additions: rows separate
    (unstructured, N:M), so every row takes its own exact line-search step and stops when its FW
    gap is below ``tol`` times its warmstart error; products with G are updated by the sparse
    change of the iterate (:func:`gram_product`); the result is never worse than the warmstart in
    any row; then exact swap refinement (:func:`sparsefw.swaps.swap_refine`; per-matrix: within
    rows). ``step="harmonic"``, ``tol=0``, ``swaps=0`` is the paper's rule.

    Args:
        W: (d_out, d_in) float weights (computed in float32 on W's device).
        G: (d_in, d_in) float Gram matrix X X^T. warm_scores: (d_out, d_in) float warmstart
            saliency (Wanda, RIA, magnitude); the warmstart mask is its top-k under ``pattern``.
        pattern: :func:`sparsefw.masks.parse_pattern`. alpha: fraction of the warmstart's kept
            weights fixed, in [0, 1]. iterations: cap on a row's FW iterations (0: the warmstart
            and the swaps only). step: ``linesearch`` (vanilla FW, exact line search),
            ``pairwise`` (Lacoste-Julien & Jaggi 2015, Algorithm 2) or ``harmonic`` (2/(t+2)).
        tol: a row stops when its FW gap <= tol * its warmstart error (0: run to the cap).
        fix: ``row`` or ``group`` (N:M only), :func:`split_fixed`.
        record_at / record_rounded: iterations at which ``history`` records the relaxed (and
            rounded) error. round_at: iterations whose rounded iterate is a candidate (default
            1, 2, 4, ...; the last always is). incremental: sparse product updates (False: dense
            GEMM each iteration, the reference). dense_above: :func:`gram_product`.
        dense_norm: ||W X||_F^2 if known. swaps: rounds of swap refinement (0 = off).
            working_set: the swaps' K.
    Returns: :class:`FWResult`.
    Raises: SparseFWError: bad step rule, tol, iterations, alpha, fix mode, shapes, N:M not
        dividing d_in, or non-finite W/G.
    """
    t0 = time.perf_counter()
    W, G = _check_solver_args(W, G, pattern, step, tol, iterations)
    warm = select(warm_scores, pattern)
    if int(iterations) == 0:        # no FW iteration: the warmstart, then the swaps (alpha plays no part)
        return _warmstart_and_swaps(W, G, warm, pattern, t0, dense_norm, swaps, working_set)
    run = _FWRun(W, G, warm_scores, warm, pattern, alpha, iterations, step, tol, fix, incremental, dense_above,
                 dense_norm, record_at, round_at, record_rounded)
    t_loop = time.perf_counter()
    setup_seconds = t_loop - t0
    run.run()
    t_loop = time.perf_counter() - t_loop
    mask, f_round, at_cap = run.finish()
    f_before_swaps = float(run.best_err.sum())
    t_swaps = time.perf_counter()
    mask, swap = run.swap(mask, swaps, working_set)
    t_swaps = time.perf_counter() - t_swaps
    d_out, per_row, denom = W.shape[0], run.per_row, run.denom
    ri = run.row_iters if per_row else run.row_iters.expand(d_out).clone()
    return FWResult(mask=mask, error_warmstart=float(run.f_warm_rows.sum()) / denom,
                    error_final=float(run.best_err.sum()) / denom, error_rounded=float(f_round.sum()) / denom,
                    relaxed_error=float(run.f_relaxed.sum()) / denom, iterations=int(ri.max()) if d_out else 0,
                    fw_gap=float(run.gap_rel.max()) if run.gap_rel.numel() else 0.0,
                    chosen=_chosen(mask, warm, per_row), seconds=time.perf_counter() - t0, loop_seconds=t_loop,
                    setup_seconds=setup_seconds, swap_seconds=t_swaps, history=run.history,
                    row_iterations=ri, at_cap=at_cap if per_row else (d_out if at_cap else 0),
                    error_before_swaps=f_before_swaps / denom, swaps=swap.swaps if swap else 0,
                    swap_rounds=swap.iterations if swap else 0)


SOLVER_BYTES_PER_ENTRY = 110
"""Peak bytes of solver state per entry of W (d_out x d_in) inside :func:`fw_solve`, measured as the
growth of peak RSS over W, G and the scores on a 2048 x 8192 layer: FW (10 iterations) then swaps
65 at 50% unstructured, 104 for 2:4 (row fixing works on the full width), swaps alone 46. The FW
state (compact W, Z0, Z, P, the last two vertices and their products, float64 rounding keys) is
freed before the swaps start."""


def rows_per_block(shape: tuple[int, int], budget_gib: float) -> int:
    """Rows of W solved at once so that the solver state fits ``budget_gib`` GiB: a multiple of
    :data:`sparsefw.swaps.ROW_TILE` (at least one tile), or all rows when they fit.

    Args: shape: (d_out, d_in). budget_gib: memory budget in GiB (> 0).
    Raises: SparseFWError for a budget that is not a positive number."""
    if not isinstance(budget_gib, (int, float)) or not math.isfinite(budget_gib) or budget_gib <= 0:
        raise SparseFWError(f"solver memory must be a positive number of GiB (e.g. 4), got {budget_gib!r}")
    d_out, d_in = shape
    rows = int(budget_gib * 2 ** 30 // (SOLVER_BYTES_PER_ENTRY * max(d_in, 1)))
    return d_out if rows >= d_out else max(ROW_TILE, rows // ROW_TILE * ROW_TILE)


def fw_solve_rows(W: torch.Tensor, G: torch.Tensor, warm_scores: torch.Tensor, pattern: Pattern,
                  block_rows: int | None = None, dense_norm: float | None = None, **kw) -> FWResult:
    """:func:`fw_solve` on blocks of ``block_rows`` rows at a time, with the same mask.

    The mask problem separates by rows for per-row patterns (unstructured, N:M): every row's
    line search, stop, rounding and swaps depend on that row alone (swap rounds on tiles of
    :data:`sparsefw.swaps.ROW_TILE` rows; GEMMs through :func:`sparsefw.gram.row_matmul`), so
    solving in blocks of whole tiles gives the same bits as the whole layer (tested) with solver
    memory ~ block_rows * d_in * :data:`SOLVER_BYTES_PER_ENTRY` bytes instead of d_out * d_in. A
    ``per-matrix`` pattern couples the rows (one budget for the matrix) and is solved whole.

    Args: W, G, warm_scores, pattern, **kw: as :func:`fw_solve`. block_rows: rows per block, a
        multiple of ROW_TILE (None: all rows). dense_norm: ||W X||_F^2 of the whole layer (the
        denominator of every block's relative errors; computed once if None).
    Returns: :class:`FWResult` of the whole layer: masks concatenated, errors summed (relative to
        the whole layer), iterations/gap/rounds the maxima, counts summed, ``history`` only when
        one block ran.
    Raises: as :func:`fw_solve`; SparseFWError for a block size that is not a multiple of ROW_TILE.
    """
    d_out = W.shape[0]
    if block_rows is None or block_rows >= d_out or pattern.kind == "per-matrix":
        return fw_solve(W, G, warm_scores, pattern, dense_norm=dense_norm, **kw)
    if block_rows <= 0 or block_rows % ROW_TILE:
        raise SparseFWError(f"row blocks must be a positive multiple of {ROW_TILE} rows, got {block_rows}")
    if dense_norm is None:
        dense_norm = sum(dense_output_norm(W[r:r + block_rows], G) for r in range(0, d_out, block_rows))
    parts = [fw_solve(W[r:r + block_rows], G, warm_scores[r:r + block_rows], pattern, dense_norm=dense_norm, **kw)
             for r in range(0, d_out, block_rows)]
    total = {k: sum(getattr(p, k) for p in parts) for k in
             ("error_warmstart", "error_final", "error_rounded", "relaxed_error", "seconds", "loop_seconds",
              "setup_seconds", "swap_seconds", "error_before_swaps", "swaps", "at_cap")}
    mask = torch.cat([p.mask for p in parts])
    warm = select(warm_scores, pattern)
    return FWResult(mask=mask, iterations=max(p.iterations for p in parts), fw_gap=max(p.fw_gap for p in parts),
                    chosen=_chosen(mask, warm, True), history=[],
                    row_iterations=torch.cat([p.row_iterations for p in parts]),
                    swap_rounds=max(p.swap_rounds for p in parts), **total)
