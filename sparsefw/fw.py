"""Frank-Wolfe over the convex hull of sparse masks for one layer (pure tensor functions).

Problem (SparseFW, arXiv 2510.13713, Eq. 2-3): for a layer with weight W (d_out, d_in) and
calibration inputs X (d_in, n), with the Gram matrix G = X X^T (d_in, d_in),

    min_M f(M) = ||(W ⊙ (1 - M)) X||_F^2 = sum_i r_i^T G r_i,   r = W ⊙ (1 - M),
    grad f(M) = -2 W ⊙ ((W ⊙ (1 - M)) G),

over the convex hull of binary masks M that meet the sparsity pattern. The FW iteration
(the paper's Algorithm 1) is M <- (1 - eta) M + eta V with V = LMO(grad f(M)), followed by a
rounding of the relaxed M back to a binary mask.

Implementation notes (see ../shared/SOLVER_NOTES.md):
* alpha trick (paper Sec. 3.3): the alpha fraction of the warmstart's kept entries with the highest
  warmstart scores is fixed to 1 (mask F); FW runs over the remaining "free" budget only, with
  M = F + Z, Z supported on the free entries.
* Incremental products: with A = W G and P = (W ⊙ M) G we have (W ⊙ (1-M)) G = A - P. P is split
  into the fixed part (W ⊙ F) G (computed once) and Pz = (W ⊙ Z) G, updated as
  Pz <- (1 - eta) Pz + eta (W ⊙ V_z) G, where V_z has only the free budget's nonzeros per row; the
  product is a gather-and-sum over rows of G (``embedding_bag``), costing nnz(V_z) * d_in.
* Exact line search: f is quadratic, so along D = V - M the best step is
  eta* = <W⊙D, (W⊙(1-M))G> / <W⊙D, (W⊙D)G>, clipped to [0, 1].
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import SparseFWError
from .masks import Pattern, _group_rank, select

STEP_RULES = ("linesearch", "harmonic")
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


def masked_gram_product(W: torch.Tensor, G: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """(W ⊙ V) G for a sparse binary V, as a gather-and-sum over rows of G.

    Row i of the result is sum_{j: V_ij} W_ij G[j, :], computed with ``embedding_bag`` (the fastest
    kernel measured here; ``torch.sparse`` ran slower than dense). Cost nnz(V) * d_in.

    Args:
        W: (d_out, d_in) float32. G: (d_in, d_in) float32. V: (d_out, d_in) bool.
    Returns:
        (d_out, d_in) float32.
    """
    d_out, d_in = W.shape
    counts = V.sum(dim=1)
    if int(counts.min()) == int(counts.max()):  # constant budget per row: one 2-D bag per row
        k = int(counts[0])
        if k == 0:
            return torch.zeros(d_out, d_in, dtype=torch.float32, device=W.device)
        cols = V.nonzero(as_tuple=True)[1].view(d_out, k)
        w = torch.gather(W, 1, cols)
        return F.embedding_bag(cols, G, per_sample_weights=w, mode="sum")
    rows, cols = V.nonzero(as_tuple=True)
    offsets = torch.zeros(d_out, dtype=torch.int64, device=W.device)
    offsets[1:] = torch.cumsum(counts, 0)[:-1]
    return F.embedding_bag(cols, G, offsets=offsets, per_sample_weights=W[rows, cols], mode="sum")


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
    """Z plus the tie-break scaled to at most 1e-9, in float64 so the tie-break stays below any
    real difference in Z. Shapes equal; returns float64."""
    t = tiebreak.double()
    return Z.double() + 1e-9 * t / t.abs().max().clamp_min(1e-300)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> in float32 BLAS (fast; relative error ~1e-7, far below what FW decisions need)."""
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def _bag(W, G, cols, Vc, view) -> torch.Tensor:
    """(W ⊙ V) G with V given by global column indices ``cols`` (d_out, nnz_per_row), or by the
    full-size bool mask when the budget per row is not constant."""
    if cols is None:
        return masked_gram_product(W, G, view.scatter(Vc).bool())
    if cols.shape[1] == 0:
        return torch.zeros(W.shape[0], W.shape[1], dtype=torch.float32, device=W.device)
    return F.embedding_bag(cols, G, per_sample_weights=torch.gather(W, 1, cols), mode="sum")


class _CompactView:
    """Coordinates of the free entries. For unstructured (row fixing) and N:M (group fixing)
    every row has the same number c of free entries, so all per-iteration work runs on compact
    (d_out, c) matrices (c = d_in - round(alpha k)) and the LMO is one argpartition (or one group
    ranking). Other cases (per-matrix, N:M with row fixing) use the full matrix (identity view)
    and the generic :func:`lmo`."""

    def __init__(self, W, free, pattern, budget, idx=None, kind="identity", m_c=0, b_c=0):
        self.W, self.free, self.pattern, self.budget = W, free, pattern, budget
        self.idx, self.kind, self.m_c, self.b_c = idx, kind, m_c, b_c
        self.identity = idx is None

    @classmethod
    def build(cls, W, free, pattern, budget, fix):
        counts = free.sum(1)
        const = int(counts.min()) == int(counts.max())
        if const and pattern.kind == "unstructured" and isinstance(budget, int):
            idx = free.nonzero(as_tuple=True)[1].view(W.shape[0], -1)
            return cls(W, free, pattern, budget, idx, "rows")
        if const and pattern.kind == "nm" and fix == "group" and isinstance(budget, int):
            idx = free.nonzero(as_tuple=True)[1].view(W.shape[0], -1)
            m_c = pattern.m - (pattern.n - budget)  # free entries per group
            return cls(W, free, pattern, budget, idx, "groups", m_c, budget)
        return cls(W, free, pattern, budget)

    def gather(self, T):
        return T if self.identity else torch.gather(T, 1, self.idx)

    def scatter(self, Tc):
        if self.identity:
            return Tc
        out = torch.zeros(self.W.shape, dtype=Tc.dtype, device=Tc.device)
        return out.scatter_(1, self.idx, Tc)

    def _pick(self, scores):
        """Best of ``scores`` (compact) under the free budget -> (V_c bool, global cols)."""
        r, c = scores.shape
        dev = scores.device
        none = (torch.zeros(r, c, dtype=torch.bool, device=dev), torch.zeros(r, 0, dtype=torch.int64, device=dev))
        if self.kind == "rows":
            k = self.budget
            if k <= 0:
                return none
            if k >= c:
                local = torch.arange(c, device=dev).expand(r, c).contiguous()
            else:  # torch.topk (unsorted) measured 1.5x faster than numpy argpartition here
                local = torch.topk(scores, k, dim=1, sorted=False).indices
            V = torch.zeros(r, c, dtype=torch.bool, device=dev).scatter_(1, local, True)
            return V, torch.gather(self.idx, 1, local)
        if self.b_c <= 0:
            return none
        V = _group_rank(scores, self.m_c) < self.b_c
        local = V.nonzero(as_tuple=True)[1].view(r, -1)
        return V, torch.gather(self.idx, 1, local)

    def lmo(self, sc):
        """LMO over the free budget (see :func:`lmo`) given sc = W ⊙ Q = -grad/2 (compact):
        V_c bool and global column indices (None for the identity view)."""
        if self.identity:
            return lmo(-sc, self.pattern, self.free, self.budget), None
        return self._pick(sc)

    def round(self, Zc, tiebreak):
        """Rounded free part of the mask, full size (d_out, d_in) bool (see :func:`round_mask`)."""
        if self.identity:
            return round_mask(Zc, tiebreak, self.pattern, self.free, self.budget)
        V, _ = self._pick(_rounding_key(Zc, self.gather(tiebreak)))
        return self.scatter(V)


# ----------------------------------------------------------------------------------------------
# The solver
# ----------------------------------------------------------------------------------------------
@dataclass
class FWResult:
    """Output of :func:`fw_solve`.

    mask: (d_out, d_in) bool final mask (the better of rounded FW and warmstart).
    error_warmstart / error_final: relative errors f(M)/||WX||^2 of the warmstart and final masks.
    error_rounded: relative error of the rounded FW mask (before the safeguard).
    relaxed_error: relative error of the relaxed iterate at the end.
    iterations: FW iterations run. fw_gap: last duality gap <grad, M - V> relative to f(warm).
    chosen: ``"fw"`` or ``"warmstart"`` (what the safeguard kept). seconds: wall time;
    loop_seconds: time in the FW iterations only (without set-up and rounding).
    history: list of (iteration, relative relaxed error, relative rounded error or None).
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
    history: list = field(default_factory=list)


def fw_solve(W: torch.Tensor, G: torch.Tensor, warm_scores: torch.Tensor, pattern: Pattern,
             alpha: float = 0.5, iterations: int = 100, step: str = "linesearch",
             tol: float = 1e-2, fix: str = "row", record_at=(), round_at=None,
             record_rounded: bool = False, incremental: bool = True) -> FWResult:
    """SparseFW mask for one layer: warmstart, alpha trick, FW iterations, rounding, safeguard.

    Algorithm 1 of arXiv 2510.13713 with the alpha trick (Sec. 3.3), plus an exact line search
    and a duality-gap stop (our additions; ``step="harmonic"`` with ``tol=0`` is the paper's).

    Args:
        W: (d_out, d_in) float weights (any float dtype; computed in float32).
        G: (d_in, d_in) float Gram matrix X X^T of the layer's calibration inputs.
        warm_scores: (d_out, d_in) float warmstart saliency (Wanda or RIA); the warmstart mask is
            its top-k under ``pattern``.
        pattern: sparsity pattern (see :func:`sparsefw.masks.parse_pattern`).
        alpha: fraction of the warmstart's kept weights fixed, in [0, 1] (the paper uses 0.9;
            0.5 had the best perplexity in our end-to-end sweep, see the README).
        iterations: maximum FW iterations T.
        step: ``"linesearch"`` (exact, closed form) or ``"harmonic"`` (eta_t = 2/(t+2), t >= 0).
        tol: stop when the FW gap <grad f(M), M - V> <= tol * f(warmstart) (0 disables; 1e-2
            reaches the 2000-iteration error within ~0.1%, scripts/bench_solver.py).
        fix: ``"row"`` or ``"group"`` (N:M only), see :func:`split_fixed`.
        record_at: iterations at which to record the relaxed error in ``history``.
        round_at: iterations whose rounded iterate is a candidate mask (default: 1, 2, 4, 8, ...
            up to ``iterations``; the final iterate always is). Each row keeps
            its best candidate, the warmstart included, so the result is never worse than the
            warmstart in any row.
        record_rounded: also round and evaluate at each record (costs one dense GEMM each).
        incremental: update P = (W ⊙ M) G with the sparse product (W ⊙ V_z) G (default); False
            recomputes (W ⊙ (1-M)) G with a dense GEMM every iteration (the reference, for
            benchmarks; same iterates up to float rounding).
    Returns:
        :class:`FWResult`.
    Raises:
        SparseFWError: bad step rule, alpha, fix mode, shapes, N:M not dividing d_in, or
            non-finite W/G.
    """
    t0 = time.perf_counter()
    if step not in STEP_RULES:
        raise SparseFWError(f"unknown step rule '{step}': use one of {', '.join(STEP_RULES)}")
    if W.dim() != 2 or G.shape != (W.shape[1], W.shape[1]):
        raise SparseFWError(f"shape mismatch: W {tuple(W.shape)} needs G of shape "
                            f"({W.shape[1]}, {W.shape[1]}), got {tuple(G.shape)}")
    pattern.check_shape(tuple(W.shape))
    W = W.detach().float().contiguous()
    G = G.detach().float().contiguous()
    if not (torch.isfinite(W).all() and torch.isfinite(G).all()):
        raise SparseFWError("weights or Gram matrix contain NaN/Inf; check the model and calibration data")

    warm = select(warm_scores, pattern)
    fixed, budget = split_fixed(warm, warm_scores, pattern, alpha, fix)
    free = ~fixed
    d_out, d_in = W.shape
    view = _CompactView.build(W, free, pattern, budget, fix)

    A = W @ G                                   # W G
    PF = (W * fixed) @ G                        # (W ⊙ F) G, fixed part
    Wc = view.gather(W)
    Zc = view.gather((warm & free).float())
    Pz = masked_gram_product(W, G, warm & free)  # (W ⊙ Z) G
    AFc = view.gather(A - PF)
    Pzc = view.gather(Pz)
    del Pz
    Fc = view.gather(fixed.float()) if view.identity else None
    denom = max(_dot(A, W), 1e-300)

    def f_relaxed(Qc):  # f(M) = <W ⊙ (1-M), (W ⊙ (1-M)) G>, only free entries have 1-M != 0
        R = Wc * (1.0 - Zc - Fc) if Fc is not None else Wc * (1.0 - Zc)
        return _dot(R, Qc)

    def full_Q():  # dense reference: (W ⊙ (1-M)) G recomputed with one GEMM
        return view.gather((W * (1.0 - fixed.float() - view.scatter(Zc))) @ G)

    def current_Q():  # (W ⊙ (1-M)) G on the free entries: A - P_F - P_z, or the dense recompute
        return AFc - Pzc if incremental else Qc

    Qc = AFc - Pzc
    f_warm = f_relaxed(Qc)
    f_cur = f_warm
    history: list = []
    gap = 0.0
    steps = 0
    # Candidate roundings: the warmstart, the rounded iterate at log-spaced iterations and at the
    # end. f is a sum over rows and every row has its own budget (unstructured, N:M), so each row
    # keeps its best candidate ("per-row safeguard"); per-matrix keeps the best whole mask.
    per_row = pattern.kind != "per-matrix"
    best_mask = warm.clone()
    best_err = row_errors(W, G, warm) if per_row else torch.tensor([reconstruction_error(W, G, warm)], dtype=torch.float64)
    round_at = set(round_at) if round_at is not None else \
        {2 ** j for j in range(0, 20) if 2 ** j <= iterations}

    def keep_better(cand):
        nonlocal best_mask, best_err
        e = row_errors(W, G, cand) if per_row else torch.tensor([reconstruction_error(W, G, cand)], dtype=torch.float64)
        better = e < best_err
        if per_row:
            best_mask[better] = cand[better]
        elif bool(better[0]):
            best_mask = cand
        best_err = torch.minimum(best_err, e)

    t_loop = time.perf_counter()
    WAFc = Wc * AFc                             # s = W ⊙ Q = W ⊙ (A - P_F) - W ⊙ P_z = -grad / 2
    for it in range(1, iterations + 1):
        sc = torch.addcmul(WAFc, Wc, Pzc, value=-1.0) if incremental else Wc * Qc
        Vc, cols = view.lmo(sc)
        Vf = Vc.float()
        Dc = Vf - Zc
        num = _dot(sc, Dc)                      # <W ⊙ D, Q>; the FW gap <grad, M - V> = 2 num
        gap = 2.0 * num
        if tol > 0 and gap <= tol * max(f_warm, 1e-300):
            break
        if incremental:                         # (W ⊙ V_z) G: nnz(V_z) * d_in flops
            Sc = view.gather(_bag(W, G, cols, Vc, view))
        if step == "linesearch":
            Ec = Wc * Dc
            if incremental:                     # (W ⊙ D) G = S - P_z
                den = _dot(Ec, Sc) - _dot(Ec, Pzc)
            else:                               # dense reference: one more GEMM
                den = _dot(Ec, view.gather(view.scatter(Ec) @ G))
            eta = min(max(num / den, 0.0), 1.0) if den > 0 else (1.0 if num > 0 else 0.0)
            if eta <= 0.0:
                break
        else:
            eta = 2.0 / (it - 1 + 2)
        steps = it
        fw_update(Zc, Vf, eta)
        if incremental:
            Pzc.mul_(1.0 - eta).add_(Sc, alpha=eta)
        else:
            Qc = full_Q()
        if it in round_at:
            keep_better(fixed | view.round(Zc, warm_scores))
        if it in record_at:
            f_cur = f_relaxed(current_Q())
            rr = None
            if record_rounded:
                Mr = fixed | view.round(Zc, warm_scores)
                rr = reconstruction_error(W, G, Mr) / denom
            history.append((it, f_cur / denom, rr))
    t_loop = time.perf_counter() - t_loop
    f_cur = f_relaxed(current_Q())
    rounded = fixed | view.round(Zc, warm_scores)
    f_round = reconstruction_error(W, G, rounded)
    keep_better(rounded)
    f_warm_exact = reconstruction_error(W, G, warm)
    mask = best_mask
    f_final = reconstruction_error(W, G, mask)
    changed = int((mask != warm).any(dim=1).sum())
    chosen = "warmstart" if changed == 0 else ("fw" if per_row is False or changed == W.shape[0] else
                                               f"fw in {changed}/{W.shape[0]} rows")
    return FWResult(mask=mask, error_warmstart=f_warm_exact / denom, error_final=f_final / denom,
                    error_rounded=f_round / denom, relaxed_error=f_cur / denom, iterations=steps,
                    fw_gap=gap / max(f_warm, 1e-300), chosen=chosen,
                    seconds=time.perf_counter() - t0, loop_seconds=t_loop, history=history)
