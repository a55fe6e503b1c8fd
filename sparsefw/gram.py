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


def all_finite(*tensors: torch.Tensor) -> bool:
    """True when no tensor holds NaN or +-Inf. One ``aminmax`` pass per tensor (NaN propagates to
    both ends, an infinity is an end): ~60x faster than ``isfinite(x).all()``, which writes a bool
    tensor of x's size (2.2 s vs 0.03 s for a 14336 x 14336 float32 G on one core). Empty tensors
    count as finite.

    Args: tensors: floating-point tensors of any shape, on any device."""
    for t in tensors:
        if t.numel() and not all(bool(torch.isfinite(v)) for v in torch.aminmax(t)):
            return False
    return True


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
    if not all_finite(W, G):
        raise SparseFWError("weights or Gram matrix contain NaN/Inf; check the model and calibration data")
    if not isinstance(percdamp, (int, float)) or not math.isfinite(percdamp) or percdamp < 0:
        raise SparseFWError(f"percdamp must be a finite number >= 0 (e.g. 0.01), got {percdamp!r}")


FACTOR_FLOAT64_MAX_DIM = 16384
"""Widest input (d_in) whose dampened Gram matrix SparseGPT factors in float64. Its factorization
holds G and two more d_in x d_in buffers: 6.4 GB in float64 at 16384 (Llama-3-8B's widest input is
14336), but 19.7 GB at Llama-3-70B's down_proj (28672), which then would not fit a 16 GiB host or a
24 GB GPU. Wider inputs are factored in float32, as the reference SparseGPT does at every width
(with the same 1% dampening): 9.9 GB there."""


def factor_dtype(d_in: int) -> torch.dtype:
    """The dtype in which SparseGPT factors the dampened Gram matrix of a layer with ``d_in``
    inputs: float64 up to :data:`FACTOR_FLOAT64_MAX_DIM`, float32 above."""
    return torch.float64 if d_in <= FACTOR_FLOAT64_MAX_DIM else torch.float32


def damped_hessian(G: torch.Tensor, percdamp: float, dtype: torch.dtype = torch.float64
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The dampened Hessian of SparseGPT: dead inputs get diag 1, then + percdamp * mean(diag) I.

    Source: SparseGPT reference implementation (``fasterprune``), Frantar & Alistarh 2023 Sec. 3.

    Args:
        G: (d_in, d_in) float Gram matrix X X^T (symmetric positive semi-definite).
        percdamp: dampening as a fraction of the mean diagonal (>= 0).
        dtype: dtype of the result (float64; SparseGPT passes :func:`factor_dtype`).
    Returns:
        (H, dead, lam): H (d_in, d_in) ``dtype`` dampened matrix (a new buffer), dead (d_in,) bool
        inputs whose diagonal was 0, lam the dampening added (float, squared activation units).
    """
    H = symmetrize_(G.detach().to(dtype, copy=True))  # exact symmetry for Cholesky
    diag = torch.diagonal(H)
    dead = diag == 0
    idx = torch.nonzero(dead, as_tuple=True)[0]
    H[idx, idx] = 1.0
    lam = float(percdamp) * float(torch.diagonal(H).mean())
    torch.diagonal(H).add_(lam)
    return H, dead, lam


def symmetrize_(A: torch.Tensor, panel: int = 1024) -> torch.Tensor:
    """A <- (A + A^T) / 2 in place, in square panels (no second (d, d) buffer); the same bits as
    ``0.5 * (A + A.T)``. A: (d, d) float. Returns A."""
    d = A.shape[0]
    for r0 in range(0, d, panel):
        for c0 in range(r0, d, panel):
            avg = 0.5 * (A[r0:r0 + panel, c0:c0 + panel] + A[c0:c0 + panel, r0:r0 + panel].T)
            A[r0:r0 + panel, c0:c0 + panel] = avg
            A[c0:c0 + panel, r0:r0 + panel] = avg.T
    return A


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


MIN_GEMM_ROWS = 8
"""BLAS (MKL here) takes another kernel below 8 rows, whose rows differ in the last bits from the
same rows inside a larger product; from 8 rows on, a row's result does not depend on the other
rows (measured here at d_in 576-4096). :func:`row_matmul` pads to this many rows."""


def row_matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A @ B with every row of the result independent of the other rows of A: fewer than
    :data:`MIN_GEMM_ROWS` rows are padded with zero rows. A (r, k), B (k, n) -> (r, n), so that a
    layer solved in row blocks gets the same bits as solved whole."""
    r = A.shape[0]
    if 0 < r < MIN_GEMM_ROWS:
        pad = torch.zeros(MIN_GEMM_ROWS - r, A.shape[1], dtype=A.dtype, device=A.device)
        return (torch.cat([A, pad]) @ B)[:r]
    return A @ B


CACHE_ROWS = 64
"""Rows per block in :func:`by_row_blocks`: 64 rows of a 28672-wide float32 matrix are 7 MiB, so a
block's intermediates stay in the 32 MiB cache of this host."""


def by_row_blocks(fn, *tensors: torch.Tensor, rows: int = CACHE_ROWS):
    """``fn(*tensors)`` computed on blocks of ``rows`` rows (the last block takes the remainder, so
    every block has at least ``rows`` rows), the results concatenated along dim 0.

    For a row-wise ``fn`` (each output row depends on the same row of the inputs alone) the bits
    are those of ``fn(*tensors)``; a chain of full-width elementwise ops then runs in cache instead
    of one pass through memory per op: a float64 row sum of 1024 x 8000 float32 entries takes
    5 ms instead of 57 ms, the swap candidates of 1024 x 14336 entries 37 ms instead of 132 ms (one
    core). Fewer than 2 * ``rows`` rows, or tensors off the CPU (a GPU wants one large kernel, not
    many small ones): one call.

    Args: fn: returns a tensor or a tuple of tensors with the rows of the inputs in dim 0.
        tensors: (r, ...) tensors, the same r. rows: block height (> 0).
    Returns: as ``fn``, (r, ...) each.
    """
    r = tensors[0].shape[0]
    if r < 2 * rows or tensors[0].device.type != "cpu":
        return fn(*tensors)
    starts = list(range(0, r - rows + 1, rows))
    outs = [fn(*(t[a:b] for t in tensors)) for a, b in zip(starts, starts[1:] + [r])]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def row_sums64(A: torch.Tensor, B: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row float64 sums of a float (r, c) tensor A, or of A * B (same shape): the bits of
    ``(A * B).sum(1, dtype=torch.float64)``, block by block (:func:`by_row_blocks`; 11x faster at
    1024 x 8000 on one core). Returns (r,) float64."""
    if B is None:
        return by_row_blocks(lambda a: a.sum(1, dtype=torch.float64), A)
    return by_row_blocks(lambda a, b: (a * b).sum(1, dtype=torch.float64), A, B)


def row_diffs(A: torch.Tensor, B: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, how many entries of A differ from B (None: from 0): ``(A != B).sum(1)``, block by
    block (:func:`by_row_blocks`; 4-10x faster at 1024 x 7885 on one core). A, B: (r, c), any
    dtypes. Returns (r,) int64."""
    if B is None:
        return by_row_blocks(lambda a: (a != 0).sum(1), A)
    return by_row_blocks(lambda a, b: (a != b).sum(1), A, B)


PANEL_COLS = 32
"""Columns of G per panel in :func:`bag_rows`: a 28672 x 32 float32 panel (3.5 MiB) stays in cache
while every bag reads its rows."""
PANEL_MIN_READS = 8
""":func:`bag_rows` goes panel by panel once the bags read at least this many times d_in rows of G
(i.e. G about this many times over); below that the single pass is as fast."""


def bag_rows(bag: torch.Tensor, idx: torch.Tensor, G: torch.Tensor, weights: torch.Tensor,
             n_bags: int) -> torch.Tensor:
    """Weighted sums of rows of G, one per bag: out[b] = sum over the entries k with bag[k] = b of
    weights[k] * G[idx[k], :] (``torch.nn.functional.embedding_bag``, mode ``sum``): the product
    E @ G of a sparse E given by its nonzeros (rows ``bag``, columns ``idx``, values ``weights``).

    When the bags read G many times over (:data:`PANEL_MIN_READS`), the sums run column panel by
    column panel (:data:`PANEL_COLS` columns of G, a strided view, no copy): one panel stays in
    cache while all bags read it, instead of every bag streaming whole rows of G from memory
    (2.2-2.3x faster for 2048 bags of 3% of 16384 rows on one core, ``scripts/bench_solver.py
    --products``). Every output entry adds the same terms in the same order either way, so the two
    paths give the same bits (tested), and a row's result never depends on the other bags.

    Args: bag: (nnz,) int64 bag of every entry, non-decreasing (row-major ``nonzero()`` order).
        idx: (nnz,) int64 rows of G. G: (d_in, d) float32. weights: (nnz,) float32.
        n_bags: number of bags (an empty bag sums to zeros).
    Returns: (n_bags, d) float32.
    """
    d = G.shape[1]
    offsets = torch.zeros(n_bags, dtype=torch.int64, device=idx.device)
    offsets[1:] = torch.cumsum(torch.bincount(bag, minlength=n_bags), 0)[:-1]
    if G.device.type != "cpu" or d <= PANEL_COLS or idx.numel() < PANEL_MIN_READS * G.shape[0]:
        return torch.nn.functional.embedding_bag(idx, G, offsets=offsets, per_sample_weights=weights, mode="sum")
    out = torch.empty(offsets.numel(), d, dtype=G.dtype, device=G.device)
    for j in range(0, d, PANEL_COLS):
        out[:, j:j + PANEL_COLS] = torch.nn.functional.embedding_bag(
            idx, G[:, j:j + PANEL_COLS], offsets=offsets, per_sample_weights=weights, mode="sum")
    return out


# ----------------------------------------------------------------------------------------------
# Exact (order-independent) accumulation of G = sum over windows of X_w^T X_w
# ----------------------------------------------------------------------------------------------
PANEL_BYTES = 1 << 28
"""Transient memory of one panel of a product or conversion (256 MiB): a (p, d_in) row panel
costs 20 bytes per entry (float32 product, int64 terms, headroom)."""


def fixed_point_scale(bound: float) -> int:
    """Exponent S of the fixed-point grid 2^-S on which G is summed exactly in int64.

    Every |G_ij| <= ``bound`` (Cauchy-Schwarz: |G_ij| <= n_tokens * max|x|^2) maps to an integer
    below 2^61, leaving a factor 4 for the float32 rounding of the window products and the sum.

    Args: bound: upper bound on |G_ij| (squared activation units), >= 0.
    Returns: S (int; 0 for a zero or non-finite bound).
    """
    if not (bound > 0 and math.isfinite(bound)):
        return 0
    return 61 - math.frexp(bound)[1]          # bound < 2^e, so bound * 2^S < 2^61


class FixedPointSum:
    """A Gram matrix (or its diagonal) summed exactly on the grid 2^-scale in int64.

    Every window's product X_w^T X_w is computed in float32, rounded once to the grid and added
    as integers. Integer addition is associative, so the sum does not depend on the order of the
    windows or on how they are split across processes: several processes add their int64 partial
    sums with any reduction (:func:`sparsefw.distributed.reduce_sum_`) to the same bits as one
    process. Only the upper triangle is kept and computed (G is symmetric): row panels
    [r0, r1) x [r0, d) of one buffer's worth of memory, d (d + p) / 2 int64 entries for panels of
    p rows, and half the products' flops. Error: at most 2^-(scale+1) per window and entry, i.e.
    about n_windows * 2^-62 * n_tokens * max|x|^2 (scripts/bench_gram_precision.py measures it
    against exact sums).

    panels: list of int64 tensors ((r1 - r0, d - r0) each; one (d,) tensor for the diagonal).
    scale: the grid exponent (:func:`fixed_point_scale`).
    """

    def __init__(self, d: int, scale: int, diagonal: bool = False, device=None):
        self.d, self.scale, self.diagonal = d, int(scale), diagonal
        p = max(1, min(d, PANEL_BYTES // (20 * max(d, 1))))
        self.starts = [0] if diagonal else list(range(0, d, p))
        self.panels = [torch.zeros(d, dtype=torch.int64, device=device)] if diagonal else \
            [torch.zeros(min(p, d - r0), d - r0, dtype=torch.int64, device=device) for r0 in self.starts]

    def _to_grid(self, P: torch.Tensor) -> torch.Tensor:
        # P * 2^scale is exact in float32 (a power of two) and so is its rounding to an integer;
        # float64 only where 2^scale itself leaves float32's range
        P = P.mul_(2.0 ** self.scale) if self.scale <= 120 else P.double().mul_(2.0 ** self.scale)
        return P.round_().to(torch.int64)

    def add_(self, x: torch.Tensor) -> None:
        """Add one window: x (tokens, d) float, G += x^T x (diagonal: sum of x^2 per column)."""
        x = x.float()
        if self.diagonal:
            self.panels[0] += self._to_grid((x * x).sum(0))
            return
        for r0, panel in zip(self.starts, self.panels):
            panel += self._to_grid(x[:, r0:r0 + panel.shape[0]].t() @ x[:, r0:])

    def tensors(self) -> list[torch.Tensor]:
        """The int64 buffers (for a reduction across processes)."""
        return self.panels

    def evaluate(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """G = sum * 2^-scale in ``dtype``, (d, d) (or (d,)), exactly symmetric: the diagonal
        squares of the panels are symmetrized in integers ((a + b) // 2), the lower triangle is
        the mirror of the upper. One rounding from the exact integer sum to float64 (then to
        ``dtype``)."""
        f = 2.0 ** -self.scale
        if self.diagonal:
            return self.panels[0].double().mul_(f).to(dtype)
        out = torch.empty(self.d, self.d, dtype=dtype, device=self.panels[0].device)
        for r0, panel in zip(self.starts, self.panels):
            p = panel.shape[0]
            sq = panel[:, :p]
            sq = torch.div(sq + sq.t(), 2, rounding_mode="floor")
            out[r0:r0 + p, r0:r0 + p] = sq.double().mul_(f)
            rest = panel[:, p:].double().mul_(f).to(dtype)
            out[r0:r0 + p, r0 + p:] = rest
            out[r0 + p:, r0:r0 + p] = rest.t()
        return out
