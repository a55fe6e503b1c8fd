"""Magnitude, Frank-Wolfe and FW + momentum pruning of a small CNN (pure-ish tensor functions).

Source: "Projection-Free CNN Pruning via Frank-Wolfe with Momentum: Sparser Models with Less
Pretraining" (arXiv 2512.01147), Algorithms 2 (magnitude), 3 (FW pruning) and 4 (FW + momentum).
The LMO, the FW step and the rounding are the SparseFW engine's own functions
(:func:`sparsefw.fw.lmo`, :func:`sparsefw.fw.fw_update`, :func:`sparsefw.fw.round_mask`), not copies.

Conventions
-----------
* All prunable weights (every conv and linear weight, biases stay dense) are viewed as ONE row
  of shape ``(1, N)`` (N = 34,720 for :class:`cnn.models.PaperCNN`): pruning is *global*, i.e.
  one budget of ``k = round((1 - s) N)`` kept weights is shared by all layers, which is what
  "global magnitude pruning" means. With :class:`sparsefw.masks.Pattern` ``("unstructured", s)``
  on a (1, N) row, the engine's per-row budget is exactly this global budget.
* A mask is ``True``/1 where a weight is kept. The relaxed mask ``m`` (float, (1, N)) lives in
  [0, 1]; the network evaluated at ``m`` uses the effective weights ``W ⊙ m``.

The mask gradient and its sign (default reading, ``reading="mask"``)
-------------------------------------------------------------------
With effective weights ``W ⊙ m`` the chain rule gives ``∂L/∂m = W ⊙ ∇_{W⊙m} L``; at ``m = 1`` this
is ``W ⊙ ∇_W L``. ``lmo`` puts 1 on the ``k`` entries with the most NEGATIVE gradient: the entries
where increasing ``m`` (keeping the weight rather than shrinking it) lowers the loss most. To first
order, removing weight i changes the loss by ``-W_i (∇_W L)_i``, so the most negative entries are
exactly the weights whose removal would hurt most; the sign is therefore used as is (no minus, no
absolute value). This is the default because it is the gradient of the paper's relaxed problem
``min_{m in conv(k-sparse masks)} L(W ⊙ m)``, to which a Frank-Wolfe method applies.
The literal reading of Algorithm 3, "keep the top-k of |G|" with ``G = ∇_W L``
(``reading="literal"``), is the LMO applied to ``-|∇_W L|``; it ignores W, so on a well-trained
network (where ∇_W L is small noise) it keeps weights by noise level, not by importance.

The FW loop (our concrete reading of Algorithms 3-4, documented in cnn/README.md)
---------------------------------------------------------------------------------
For each sparsity level ``s_i`` of the schedule (one level for Algorithm 3, a ramp for 4):
start from the current network (``m = 1`` at the first level, the previous level's rounded mask
afterwards), then for ``t = 1..T``:
``g_t`` = mask gradient on a fresh random subsample of S training examples, evaluated at the
current relaxed ``m``; ``G <- μ G + (1 - μ) g_t`` (EMA; ``G = 0`` before the first evaluation;
``μ = 0`` is vanilla FW); ``V = LMO(G, k_i)``; ``m <- (1 - η_t) m + η_t V`` with ``η_t = 2/(t+2)``.
Then round ``m`` to the ``k_i`` largest entries (ties broken by ``|W|``), zero the other weights and
fine-tune with the mask fixed. The EMA ``G`` persists across the levels of the ramp.
``W`` is the stored weight: pruned weights keep their last value in storage (as
``torch.nn.utils.prune`` keeps ``weight_orig``), so the mask gradient of a pruned weight is not
trivially 0 and a weight the (momentum) gradient brings back returns with its old value instead of
as a dead zero. (Without the store, the EMA kept selecting already-zeroed weights at later levels
of the ramp and FW + momentum collapsed to ~76% at 90% sparsity from the 2-epoch checkpoint.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from sparsefw.errors import SparseFWError
from sparsefw.fw import fw_update, lmo, round_mask
from sparsefw.masks import Pattern, select

READINGS = ("mask", "literal")
RAMPS = ("linear", "cubic")


# ----------------------------------------------------------------------------------------------
# Flattening: all prunable weights as one (1, N) row
# ----------------------------------------------------------------------------------------------
def flatten(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors (in dict order) into one row.

    Args:
        tensors: name -> tensor of any shape (weights, gradients or masks; any dtype).
    Returns:
        (1, N) tensor, N = total number of entries; float inputs become float32, bool stays bool.
    Raises:
        SparseFWError: if ``tensors`` is empty.
    """
    if not tensors:
        raise SparseFWError("no tensors to flatten: the model has no prunable (conv/linear) weights")
    parts = [t.detach().reshape(-1) for t in tensors.values()]
    out = torch.cat(parts)
    if out.is_floating_point():
        out = out.float()
    return out.view(1, -1)


def unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten`: split a (1, N) row into tensors shaped like ``like``.

    Args:
        flat: (1, N) or (N,) tensor (any dtype; kept). like: name -> tensor giving shapes and order.
    Returns: name -> tensor with ``like[name].shape`` (views into ``flat``'s storage when possible).
    Raises:
        SparseFWError: if N does not match the total size of ``like``.
    """
    flat = flat.reshape(-1)
    total = sum(t.numel() for t in like.values())
    if flat.numel() != total:
        raise SparseFWError(f"flat mask has {flat.numel()} entries but the weights have {total}; "
                            "build the mask from the same model")
    out, pos = {}, 0
    for name, t in like.items():
        out[name] = flat[pos:pos + t.numel()].view(t.shape)
        pos += t.numel()
    return out


def kept_count(n: int, sparsity: float) -> int:
    """Number of kept weights k = round((1 - sparsity) * n) of n prunable weights.

    Raises: SparseFWError if sparsity is not in [0, 1).
    """
    if not (0.0 <= float(sparsity) < 1.0) or math.isnan(sparsity):
        raise SparseFWError(f"sparsity must be in [0, 1) (e.g. 0.9 for 90%), got {sparsity!r}")
    return int(round((1.0 - float(sparsity)) * n))


def _pattern(sparsity: float) -> Pattern:
    return Pattern("unstructured", float(sparsity))


# ----------------------------------------------------------------------------------------------
# Algorithm 2: global magnitude pruning
# ----------------------------------------------------------------------------------------------
def global_magnitude_mask(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Global magnitude pruning (arXiv 2512.01147, Algorithm 2, lines 1-2): keep the k weights of
    largest |W| over all prunable tensors together, k = round((1 - s) N).

    Uses the engine's selection (``sparsefw.fw.round_mask`` on |W|, i.e. budgeted top-k).

    Args:
        weights: name -> float weight tensor (any shapes). sparsity: fraction removed in [0, 1).
    Returns: name -> bool mask (same shapes), exactly k True in total.
    Raises: SparseFWError on bad sparsity or no weights.
    """
    W = flatten(weights)
    k = kept_count(W.shape[1], sparsity)
    free = torch.ones_like(W, dtype=torch.bool)
    M = round_mask(W.abs(), W.abs(), _pattern(sparsity), free, k)
    return unflatten(M, weights)


# ----------------------------------------------------------------------------------------------
# Algorithms 3-4: pieces
# ----------------------------------------------------------------------------------------------
def mask_gradient(W: torch.Tensor, grad_W: torch.Tensor, reading: str = "mask") -> torch.Tensor:
    """The gradient handed to the LMO (arXiv 2512.01147, Algorithm 3, line 3).

    Args:
        W: (1, N) float32 current weights (not multiplied by the relaxed mask).
        grad_W: (1, N) float32 gradient of the mean loss with respect to the EFFECTIVE weights
            ``W ⊙ m`` (at m = 1 simply ∇_W L).
        reading: ``"mask"`` (default): ∂L/∂m = W ⊙ grad_W (see the module docstring for the sign);
            ``"literal"``: -|grad_W|, so that the LMO keeps the top-k of |∇_W L|.
    Returns: (1, N) float32.
    Raises: SparseFWError for an unknown reading or mismatched shapes.
    """
    if reading not in READINGS:
        raise SparseFWError(f"unknown mask-gradient reading '{reading}': use 'mask' or 'literal'")
    if W.shape != grad_W.shape:
        raise SparseFWError(f"W {tuple(W.shape)} and its gradient {tuple(grad_W.shape)} differ in shape")
    if reading == "mask":
        return W.float() * grad_W.float()
    return -grad_W.float().abs()


def ema_update(G: torch.Tensor | None, g: torch.Tensor, momentum: float) -> torch.Tensor:
    """Momentum on the gradient: G <- μ G + (1 - μ) g (arXiv 2512.01147, Algorithm 4; the paper's
    "G <- m·G" read as an exponential moving average). ``G = None`` (first call) means G = 0, so
    the first call returns (1 - μ) g; the LMO is invariant to the scale of G, so this equals the
    bias-corrected (Adam-style) average and the first, noisiest gradient (at m = 1 on a trained
    network) gets weight μ^(t-1) (1 - μ) like any other, not the μ^(t-1) of ``G = g_1``.

    Args: G: (1, N) float or None. g: (1, N) float new gradient. momentum: μ in [0, 1).
    Returns: new (1, N) float tensor (inputs not modified).
    Raises: SparseFWError if μ is outside [0, 1).
    """
    if not (0.0 <= float(momentum) < 1.0):
        raise SparseFWError(f"momentum must be in [0, 1) (0 = vanilla FW), got {momentum!r}")
    if G is None:
        return g * (1.0 - momentum)
    return G * momentum + g * (1.0 - momentum)


def sparsity_schedule(s_init: float, s_final: float, steps: int, kind: str = "linear") -> list[float]:
    """Sparsity levels of the pruning ramp (arXiv 2512.01147, Algorithm 4: linear).

    Linear: s_i = s_init + (s_final - s_init) (i-1)/(N-1); cubic (Zhu & Gupta 2017, Eq. 1):
    s_i = s_final + (s_init - s_final) (1 - (i-1)/(N-1))^3, for i = 1..N. ``steps = 1`` gives
    ``[s_final]`` (one-shot).

    Args: s_init, s_final: fractions in [0, 1), s_init <= s_final. steps: N >= 1. kind: linear|cubic.
    Returns: list of N floats, ending at s_final.
    Raises: SparseFWError on bad arguments.
    """
    if kind not in RAMPS:
        raise SparseFWError(f"unknown sparsity ramp '{kind}': use 'linear' or 'cubic'")
    if int(steps) < 1:
        raise SparseFWError(f"the ramp needs at least 1 step, got {steps}")
    for s in (s_init, s_final):
        kept_count(1, s)
    if s_init > s_final:
        raise SparseFWError(f"s_init ({s_init}) must not exceed s_final ({s_final})")
    if steps == 1:
        return [float(s_final)]
    out = []
    for i in range(steps):
        frac = i / (steps - 1)
        if kind == "linear":
            out.append(s_init + (s_final - s_init) * frac)
        else:
            out.append(s_final + (s_init - s_final) * (1.0 - frac) ** 3)
    out[-1] = float(s_final)
    return out


def fw_step(m: torch.Tensor, grad: torch.Tensor, k: int, eta: float) -> torch.Tensor:
    """One FW step over the convex hull of masks with k kept: V = LMO(grad), m <- (1-η) m + η V.

    Engine calls: ``sparsefw.fw.lmo`` (k most negative entries of ``grad``) and
    ``sparsefw.fw.fw_update`` (in place). Source: arXiv 2512.01147, Algorithm 3, lines 4-5.

    Args:
        m: (1, N) float32 relaxed mask, updated in place. grad: (1, N) float mask gradient.
        k: kept entries, 0 <= k <= N. eta: step size in [0, 1].
    Returns: V, the (1, N) bool vertex (exactly k True).
    Raises: SparseFWError on a bad step size or k.
    """
    n = m.shape[1]
    if not (0 <= k <= n):
        raise SparseFWError(f"k must be in [0, {n}], got {k}")
    free = torch.ones_like(m, dtype=torch.bool)
    V = lmo(grad, _pattern(1.0 - k / n if k > 0 else 0.0), free, int(k))
    fw_update(m, V, eta)
    return V


def round_relaxed(m: torch.Tensor, k: int, tiebreak: torch.Tensor) -> torch.Tensor:
    """Round a relaxed mask to a binary one with exactly k kept: the k largest entries of m, ties
    broken by ``tiebreak`` (we pass |W|). Engine call: ``sparsefw.fw.round_mask``.

    Args: m: (1, N) float in [0, 1]. k: kept count. tiebreak: (1, N) float.
    Returns: (1, N) bool with exactly k True.
    """
    n = m.shape[1]
    free = torch.ones_like(m, dtype=torch.bool)
    return round_mask(m, tiebreak, _pattern(1.0 - k / n if k > 0 else 0.0), free, int(k))


def step_size(t: int) -> float:
    """FW step size η_t = 2 / (t + 2) for t = 1, 2, ... (first step 2/3, keeps 1/3 of m = 1)."""
    return 2.0 / (t + 2.0)


# ----------------------------------------------------------------------------------------------
# Warmstart with alpha-fixing and per-layer budgets (the LLM engine's method on the CNN)
# ----------------------------------------------------------------------------------------------
def _as_rows(x: torch.Tensor, sizes: list[int], fill) -> torch.Tensor:
    """(1, N) -> (L, max n_l): layer l's entries in row l, padded with ``fill``."""
    out = torch.full((len(sizes), max(sizes)), fill, dtype=x.dtype, device=x.device)
    pos = 0
    for i, n in enumerate(sizes):
        out[i, :n] = x[0, pos:pos + n]
        pos += n
    return out


def _as_flat(X: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Inverse of :func:`_as_rows`: (L, max n_l) -> (1, N)."""
    return torch.cat([X[i, :n] for i, n in enumerate(sizes)]).unsqueeze(0)


class WarmBudget:
    """The SparseFW warmstart on the global problem: the global-magnitude mask at k kept (a vertex),
    its alpha fraction with the largest |W| fixed in every layer (SparseFW Sec. 3.3, the alpha
    trick), and every layer keeping the magnitude mask's count k_l, so that FW only re-chooses
    which weights, not how many per layer. Layer l is row l of a padded (L, max n_l) matrix, so
    the engine's ``select`` / ``lmo`` / ``round_mask`` with per-row budgets do the work.

    Args:
        W: (1, N) float current weights (all prunable layers, in ``sizes`` order). k: total kept.
        sizes: n_l per layer (sum N); ``None`` = one layer (the budget is global only).
        alpha: fraction of each layer's magnitude-kept weights fixed, in [0, 1].
    Attributes: start: (1, N) float32 magnitude mask. kept: (L,) int64 k_l.
    Raises: SparseFWError on alpha outside [0, 1] or sizes that do not sum to N.
    """

    def __init__(self, W: torch.Tensor, k: int, sizes: list[int] | None, alpha: float):
        n = W.shape[1]
        self.sizes = list(sizes) if sizes else [n]
        if sum(self.sizes) != n:
            raise SparseFWError(f"layer sizes sum to {sum(self.sizes)}, not to the {n} prunable weights")
        if not (0.0 <= float(alpha) <= 1.0):
            raise SparseFWError(f"alpha must be in [0, 1] (fraction of warmstart weights fixed), got {alpha!r}")
        mag = round_relaxed(W.abs(), k, W.abs())
        self.start = mag.float()
        self.pattern = Pattern("unstructured", 1.0 - k / n if n else 0.0)
        self.tie = _as_rows(W.abs().float(), self.sizes, 0.0)
        warm = _as_rows(mag, self.sizes, False)
        self.kept = warm.sum(1)
        nfix = torch.round(float(alpha) * self.kept.double()).long()
        self.fixed = select(self.tie, self.pattern, eligible=warm, budget=nfix)
        self.free = _as_rows(torch.ones_like(mag), self.sizes, False) & ~self.fixed
        self.budget = self.kept - nfix

    def lmo(self, grad: torch.Tensor) -> torch.Tensor:
        """(1, N) bool vertex: the fixed entries plus, per layer, the budget's free entries with the
        most negative ``grad`` (engine :func:`sparsefw.fw.lmo`)."""
        V = lmo(_as_rows(grad.float(), self.sizes, 0.0), self.pattern, self.free, self.budget)
        return _as_flat(V | self.fixed, self.sizes)

    def round(self, m: torch.Tensor) -> torch.Tensor:
        """(1, N) bool: the fixed entries plus, per layer, the budget's largest free entries of the
        relaxed ``m``, ties by |W| (engine :func:`sparsefw.fw.round_mask`)."""
        M = round_mask(_as_rows(m.float(), self.sizes, 0.0), self.tie, self.pattern, self.free, self.budget)
        return _as_flat(M | self.fixed, self.sizes)


# ----------------------------------------------------------------------------------------------
# Algorithms 3-4: the loop
# ----------------------------------------------------------------------------------------------
GradFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
FinetuneFn = Callable[[torch.Tensor, int], None]


@dataclass
class FWPruneResult:
    """Output of :func:`fw_prune`.

    mask: (1, N) bool final mask. history: one dict per sparsity level with the level, k, the
    number of gradient evaluations so far and the overlap (fraction of kept entries shared) of
    the rounded mask with the global-magnitude mask at the same k.
    """

    mask: torch.Tensor
    history: list = field(default_factory=list)


INITS = ("ones", "magnitude")


def fw_prune(grad_fn: GradFn, finetune_fn: FinetuneFn, n: int, schedule: list[float],
             iterations: int, momentum: float = 0.0, reading: str = "mask",
             init: str = "ones", weights_fn: Callable[[], torch.Tensor] | None = None,
             alpha: float | None = None, sizes: list[int] | None = None) -> FWPruneResult:
    """FW pruning (Algorithm 3: ``schedule=[s]``, ``momentum=0``) and FW + momentum
    (Algorithm 4: a ramp and ``momentum > 0``) of arXiv 2512.01147, in the reading described in
    the module docstring.

    Args:
        grad_fn: ``grad_fn(m) -> (W, grad_W)``: given the (1, N) float32 relaxed mask m, returns the
            current (1, N) weights W and the (1, N) gradient of the mean loss on a FRESH random
            subsample of S training examples with respect to the effective weights W ⊙ m.
        finetune_fn: ``finetune_fn(M, level)``: zero the weights outside the (1, N) bool mask M and
            fine-tune with M fixed (``level`` = index in ``schedule``).
        n: number of prunable weights N. schedule: sparsity levels (see :func:`sparsity_schedule`).
        iterations: FW iterations T per level (>= 1). momentum: EMA factor μ in [0, 1).
        reading: ``"mask"`` or ``"literal"`` (see :func:`mask_gradient`).
        init: starting point of every level: ``"ones"`` (the current network: m = 1 at the
            first level, as in the paper, then the previous level's rounded mask) or ``"magnitude"`` (the global-magnitude mask at the level's k, a vertex of the
            polytope, like SparseFW's warmstart).
        weights_fn: ``weights_fn() -> W`` (1, N) current weights; needed for ``init="magnitude"``.
        alpha, sizes: the LLM engine's warmstart (:class:`WarmBudget`, ): with
            ``init="magnitude"`` and alpha given, every level fixes the alpha fraction of the
            magnitude mask in each layer, keeps each layer's magnitude count k_l (``sizes`` = the
            layers' n_l; None = one global budget), and FW re-chooses the rest. alpha = 1 returns
            the global-magnitude mask exactly.
    Returns: :class:`FWPruneResult`.
    Raises: SparseFWError on bad arguments.
    """
    if int(iterations) < 1:
        raise SparseFWError(f"FW needs at least 1 iteration per level, got {iterations}")
    if not schedule:
        raise SparseFWError("empty sparsity schedule")
    if init not in INITS:
        raise SparseFWError(f"unknown FW start '{init}': use 'ones' or 'magnitude'")
    if init == "magnitude" and weights_fn is None:
        raise SparseFWError("init='magnitude' needs weights_fn (the current weights)")
    if alpha is not None and init != "magnitude":
        raise SparseFWError("alpha-fixing needs the magnitude warmstart: use init='magnitude'")
    G = None
    M = None
    evals = 0
    history = []
    for level, s in enumerate(schedule):
        k = kept_count(n, s)
        m = torch.ones(1, n, dtype=torch.float32) if M is None else M.float()
        warm = None
        if init == "magnitude":
            W0 = weights_fn()
            if alpha is None:
                m = round_relaxed(W0.abs(), k, W0.abs()).float()
            else:
                warm = WarmBudget(W0, k, sizes, alpha)
                m = warm.start.clone()
        W = None
        for t in range(1, int(iterations) + 1):
            W, gW = grad_fn(m)
            evals += 1
            G = ema_update(G, mask_gradient(W, gW, reading), momentum)
            if warm is None:
                fw_step(m, G, k, step_size(t))
            else:
                fw_update(m, warm.lmo(G), step_size(t))
        M = round_relaxed(m, k, W.abs()) if warm is None else warm.round(m)
        mag = round_relaxed(W.abs(), k, W.abs())
        history.append({"level": level, "sparsity": float(s), "kept": int(k), "grad_evals": evals,
                        "overlap_with_magnitude": float((M & mag).sum()) / max(k, 1)})
        finetune_fn(M, level)
    return FWPruneResult(mask=M, history=history)
