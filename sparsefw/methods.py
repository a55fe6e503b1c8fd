"""Pruning methods: one registry, one signature (pure tensor functions behind a thin interface).

Every method is a function ``fn(W, stats, pattern, **options) -> LayerResult``: it receives one
layer's weight W (d_out, d_in) float32, the layer's calibration statistics (:class:`LayerStats`:
the Gram matrix G = X X^T and what derives from it), the parsed sparsity pattern and its own
options, and returns the mask (and, if it updates them, the new weights). It is registered under
its name with :func:`register`, with a one-line description and its options (:class:`Option`).
The CLI flags, the YAML keys, ``report.json``, the model card, the comparison configs and the
CNN's layerwise pruning (``cnn/layerwise.py``) all read :data:`METHODS`; adding a method is one
function and one ``@register`` (README, "Add a method"). The split follows llm-compressor's pure
``*_sparsify`` functions behind a small modifier, and ``torch.nn.utils.prune``'s small interface.

Built in:

* ``magnitude``: |W| (Han et al., NeurIPS 2015).
* ``wanda``: |W_ij| ||X_j|| (Sun et al., ICLR 2024, Eq. 1).
* ``ria``: relative importance and activations (Zhang et al., ICLR 2024, Eq. 3).
* ``sparsegpt``: OBS weight updates column block by column block (Frantar & Alistarh, ICML 2023,
  Algorithm 1).
* ``swaps``: a warmstart mask refined by exact 1-swaps (SparseSwaps, arXiv 2512.10922).
* ``sparsefw``: SparseFW (arXiv 2510.13713, Algorithm 1 with the alpha trick of Sec. 3.3):
  warmstart, alpha-fixing, Frank-Wolfe iterations over the convex hull of masks, rounding; then
  the swap refinement unless ``swaps=0`` (the paper's algorithm; what remains ours is the per-row
  exact line search with its gap stop, ``step="harmonic", tol=0`` being the paper's rule, and the
  per-row choice of the better of the warmstart and the rounded iterates).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import SparseFWError
from .fw import (FIX_MODES, STEP_RULES, dense_output_norm, fw_solve_rows, reconstruction_error, rows_per_block,
                 weight_error)
from .masks import Pattern, magnitude_scores, ria_scores, select, wanda_scores


# ----------------------------------------------------------------------------------------------
# The interface
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One option of a method: its CLI flag is ``--name`` (``_`` written ``-``), its YAML key and
    report field ``name``.

    name: identifier. default: value when not given (its Python type is the option's type).
    help: one line for ``--help``. choices: allowed values (optional). low / high: inclusive
    bounds for numbers (optional).
    """

    name: str
    default: Any
    help: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None

    @property
    def type(self) -> type:
        """The option's Python type: that of its default (bool, int, float or str)."""
        return type(self.default)

    def parse(self, value: Any) -> Any:
        """``value`` converted to the option's type and checked.

        Raises: SparseFWError naming the flag and the allowed values."""
        flag = "--" + self.name.replace("_", "-")
        try:
            if self.type is bool:
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(value)
                    value = value.lower() in ("true", "1", "yes")
                v = bool(value)
            elif self.type is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                v = int(value)
            else:
                v = self.type(value)
        except (TypeError, ValueError):
            raise SparseFWError(f"{flag} must be a {self.type.__name__} ({self.help}), got {value!r}") from None
        if self.choices is not None and v not in self.choices:
            raise SparseFWError(f"unknown {flag} '{v}': use one of {', '.join(map(str, self.choices))}")
        if isinstance(v, float) and math.isnan(v):
            raise SparseFWError(f"{flag} must be a number ({self.help}), got {value!r}")
        if (self.low is not None and v < self.low) or (self.high is not None and v > self.high):
            rng = f"in [{self.low}, {self.high}]" if self.high is not None else f">= {self.low}"
            raise SparseFWError(f"{flag} must be {rng} ({self.help}), got {value!r}")
        return v


@dataclass
class LayerStats:
    """Calibration statistics of one layer, as every method receives them.

    G: (d_in, d_in) Gram matrix X X^T of the layer's calibration inputs (squared activation units
    summed over tokens): for methods that set weights (SparseGPT) and for reconstruction in
    :func:`sparsefw.gram.factor_dtype` (float64, float32 above d_in 16384), else the float32 ``Gf``
    itself (the pipeline does not keep a float64 copy they would not use).
    Gf: G in float32. col_norms: (d_in,) float32 ||X_j|| = sqrt(Gf_jj) (from Gf, so that masks do
    not depend on which of the two G is).
    dense_norm: ||W X||_F^2 of the dense layer (the denominator of relative errors).
    percdamp: the run's dampening of G, as a fraction of its mean diagonal (SparseGPT's convention),
    for methods that factor G.
    """

    G: torch.Tensor
    Gf: torch.Tensor
    col_norms: torch.Tensor
    dense_norm: float
    percdamp: float = 0.01

    @classmethod
    def from_gram(cls, W: torch.Tensor, G: torch.Tensor, percdamp: float = 0.01) -> "LayerStats":
        """The statistics of a layer with weight W (d_out, d_in) float32 and Gram matrix G
        (d_in, d_in) float64 or float32 (G on W's device)."""
        Gf = G.float()
        col_norms = torch.diagonal(Gf).clamp_min(0).sqrt()
        return cls(G=G, Gf=Gf, col_norms=col_norms, dense_norm=max(dense_output_norm(W, Gf), 1e-300),
                   percdamp=percdamp)


@dataclass
class LayerResult:
    """What a method returns for one layer.

    mask: (d_out, d_in) bool, True = kept, meeting the pattern. weight: (d_out, d_in) float32 new
    weights (exactly 0 off the mask) for methods that update the kept weights (SparseGPT), else
    None (the weights are W ⊙ mask). info: optional numbers for the report: relative errors
    ``error_final`` / ``error_warmstart`` / ``error_wanda`` when the method knows them without
    another product, solver counters, ``timings`` (seconds per part); any other key goes to the
    layer's ``extra`` entry.
    """

    mask: torch.Tensor
    weight: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registered method: ``fn(W, stats, pattern, **options) -> LayerResult``, its one-line
    description (CLI help, model card), its options, and whether it sets the kept weights itself
    (then ``--reconstruct`` does not apply)."""

    name: str
    fn: Callable[..., LayerResult]
    description: str
    options: tuple[Option, ...] = ()
    updates_weights: bool = False

    def resolve(self, given: dict) -> dict:
        """Every option of the method: the given values (checked) and the defaults.

        Raises: SparseFWError for an option this method does not have."""
        mine = {o.name: o for o in self.options}
        other = sorted(k for k in given if k not in mine)
        if other:
            flags = ", ".join("--" + k.replace("_", "-") for k in other)
            owners = sorted({m.name for m in METHODS.values() for o in m.options if o.name in other})
            raise SparseFWError(f"{flags} does not apply to --method {self.name}"
                                + (f" (only to {', '.join(owners)})" if owners else "") + "; drop it")
        return {n: (o.parse(given[n]) if n in given else o.default) for n, o in mine.items()}

    def options_text(self, values: dict) -> str:
        """The method's options with their values in ``values`` (e.g. a report), as text:
        ``"warmstart wanda, alpha 0.9, ..."`` (empty for a method without options)."""
        return ", ".join(f"{o.name} {values.get(o.name)}" for o in self.options)


METHODS: dict[str, Method] = {}


def register(name: str, description: str, options=(), updates_weights: bool = False):
    """Decorator registering ``fn(W, stats, pattern, **options) -> LayerResult`` as method ``name``.

    Args: name: the ``--method`` value. description: one line (CLI help, model card). options:
        :class:`Option` list; an option name used by several methods must be the same Option.
        updates_weights: the method returns new weights (``--reconstruct`` then does not apply).
    Returns: the decorator (it returns ``fn`` unchanged).
    Raises: SparseFWError if an option differs from another method's option of the same name (a
        clash with a run setting of :class:`sparsefw.config.PruneConfig` fails when the CLI is built).
    """
    options = tuple(options)

    def deco(fn):
        known = all_options()
        for o in options:
            if o.name in known and known[o.name] != o:
                raise SparseFWError(f"method option '{o.name}' differs from the option of that name "
                                    "another method declares; reuse that Option")
        METHODS[name] = Method(name, fn, description, options, updates_weights)
        return fn
    return deco


def get_method(name: str) -> Method:
    """The registered method ``name``. Raises SparseFWError listing the known ones."""
    if name not in METHODS:
        raise SparseFWError(f"unknown method '{name}': use one of {', '.join(METHODS)}")
    return METHODS[name]


def all_options() -> dict[str, Option]:
    """Every method option by name (an option shared by several methods appears once)."""
    return {o.name: o for m in METHODS.values() for o in m.options}


# ----------------------------------------------------------------------------------------------
# Built-in methods
# ----------------------------------------------------------------------------------------------
WARMSTART = Option("warmstart", "wanda", "scores of the warmstart mask", choices=("wanda", "ria", "magnitude"))
SWAPS = Option("swaps", 50, "rounds of exact swap refinement of the mask (0 = off)", low=0)
SOLVER_MEMORY = Option("solver_memory", 4.0, "GiB of solver state per layer: rows are solved in blocks that fit "
                       "(the same mask as one block)", low=0.01)
DEFAULT_ITERATIONS = 10   # chosen on validation text (Austen): docs/solver.md, "Number of FW iterations"


def warmstart_scores(W: torch.Tensor, stats: LayerStats, warmstart: str) -> torch.Tensor:
    """(d_out, d_in) float32 saliency of ``warmstart`` (wanda | ria | magnitude) for W."""
    if warmstart == "wanda":
        return wanda_scores(W, stats.col_norms)
    if warmstart == "ria":
        return ria_scores(W, stats.col_norms)
    return magnitude_scores(W)


def _score_method(scores: str, W, stats: LayerStats, pattern: Pattern) -> LayerResult:
    mask = select(warmstart_scores(W, stats, scores), pattern)
    err = reconstruction_error(W, stats.Gf, mask) / stats.dense_norm
    info = {"error_warmstart": err, "error_final": err}
    if scores == "wanda":
        info["error_wanda"] = err
    return LayerResult(mask, info=info)


@register("magnitude", "magnitude pruning: keep the largest |W| (Han et al. 2015)")
def magnitude(W, stats, pattern):
    """Magnitude mask: top-k of |W| under ``pattern``. W (d_out, d_in) float32."""
    return _score_method("magnitude", W, stats, pattern)


@register("wanda", "Wanda: keep the largest |W_ij| * ||X_j|| (Sun et al. 2024, Eq. 1)")
def wanda(W, stats, pattern):
    """Wanda mask: top-k of |W_ij| ||X_j|| under ``pattern`` (Sun et al., ICLR 2024, Eq. 1)."""
    return _score_method("wanda", W, stats, pattern)


@register("ria", "RIA: relative importance times activations (Zhang et al. 2024, Eq. 3)")
def ria(W, stats, pattern):
    """RIA mask (Zhang et al., ICLR 2024, Eq. 3) under ``pattern``."""
    return _score_method("ria", W, stats, pattern)


@register("sparsegpt", "SparseGPT: OBS weight updates column block by column block (Frantar & Alistarh 2023)",
          options=[Option("blocksize", 128, "SparseGPT column block size", low=1)], updates_weights=True)
def sparsegpt(W, stats, pattern, blocksize=128):
    """SparseGPT (Frantar & Alistarh, ICML 2023, Algorithm 1): mask and updated weights, G dampened
    by ``stats.percdamp``. Raises SparseFWError when the dampened G is not positive definite."""
    from .sparsegpt_sparsify import sparsegpt_prune

    W_new, mask = sparsegpt_prune(W, stats.G, pattern, blocksize=blocksize, percdamp=stats.percdamp)
    return LayerResult(mask, weight=W_new)


def _fw_result(res, warmstart: str) -> LayerResult:
    info = dict(iterations=res.iterations, fw_gap=res.fw_gap, chosen=res.chosen, error_warmstart=res.error_warmstart,
                at_cap=res.at_cap, swaps=res.swaps, error_before_swaps=res.error_before_swaps,
                error_final=res.error_final,
                timings=dict(warmstart=res.setup_seconds, fw_iterations=res.loop_seconds, swaps=res.swap_seconds,
                             rounding=res.seconds - res.setup_seconds - res.loop_seconds - res.swap_seconds))
    if warmstart == "wanda":
        info["error_wanda"] = res.error_warmstart              # the warmstart is Wanda's mask
    return LayerResult(res.mask, info=info)


@register("swaps", "warmstart mask refined by exact 1-swaps (SparseSwaps, arXiv 2512.10922)",
          options=[WARMSTART, SWAPS, SOLVER_MEMORY])
def swaps(W, stats, pattern, warmstart="wanda", swaps=50, solver_memory=4.0):
    """The warmstart's mask refined by :func:`sparsefw.swaps.swap_refine` (``swaps`` rounds);
    no Frank-Wolfe iteration (:func:`sparsefw.fw.fw_solve` with ``iterations=0``)."""
    res = fw_solve_rows(W, stats.Gf, warmstart_scores(W, stats, warmstart), pattern,
                        rows_per_block(tuple(W.shape), solver_memory), iterations=0, swaps=swaps,
                        dense_norm=stats.dense_norm)
    return _fw_result(res, warmstart)


@register("sparsefw", "SparseFW: Frank-Wolfe over the convex hull of masks (arXiv 2510.13713), then swaps",
          options=[WARMSTART,
                   Option("alpha", 0.9, "fraction of the warmstart's kept weights fixed (the paper's 0.9)",
                          low=0.0, high=1.0),
                   Option("fix", "row", "alpha fixing per row, or per group (N:M only)", choices=FIX_MODES),
                   Option("iterations", DEFAULT_ITERATIONS, "cap on the FW iterations of a row", low=0),
                   Option("step", "linesearch", "FW step: per-row exact line search, pairwise FW, or 2/(t+2)",
                          choices=STEP_RULES),
                   Option("tol", 1e-2, "a row stops when its FW gap <= tol x its warmstart error", low=0.0),
                   SWAPS, SOLVER_MEMORY])
def sparsefw(W, stats, pattern, warmstart="wanda", alpha=0.9, fix="row", iterations=DEFAULT_ITERATIONS,
             step="linesearch", tol=1e-2, swaps=50, solver_memory=4.0):
    """SparseFW mask (:func:`sparsefw.fw.fw_solve`): warmstart, alpha-fixing, FW iterations,
    rounding, then ``swaps`` rounds of exact swap refinement (0 = the paper's algorithm, see the
    module docstring). ``fix`` applies to N:M patterns only (else ``row``); ``solver_memory``
    (GiB) sets the row blocks (:func:`sparsefw.fw.fw_solve_rows`)."""
    res = fw_solve_rows(W, stats.Gf, warmstart_scores(W, stats, warmstart), pattern,
                        rows_per_block(tuple(W.shape), solver_memory), alpha=alpha, iterations=iterations,
                        step=step, tol=tol, fix=fix if pattern.kind == "nm" else "row", swaps=swaps,
                        dense_norm=stats.dense_norm)
    return _fw_result(res, warmstart)


# ----------------------------------------------------------------------------------------------
# One layer, any method
# ----------------------------------------------------------------------------------------------
def solve_layer(W: torch.Tensor, G: torch.Tensor, pattern: Pattern, method: str, options: dict | None = None,
                reconstruct: bool = False, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Choose the mask (and weights) of one layer with a registered method.

    Args:
        W: (d_out, d_in) float32 weights. G: (d_in, d_in) Gram matrix of its inputs, on W's
            device, in :func:`sparsefw.gram.factor_dtype` (float64, float32 above d_in 16384)
            for ``reconstruct`` and for methods that set weights (SparseGPT), else float32
            suffices (masks and FW compute in float32).
        pattern: parsed sparsity pattern. method: a name in :data:`METHODS`. options: the
            method's options (missing ones take their defaults; checked here).
        reconstruct: least-squares update of the kept weights after the mask is chosen
            (:func:`sparsefw.reconstruct.reconstruct_weights`; not for methods that set weights).
        percdamp: dampening of G (fraction of its mean diagonal) for SparseGPT and reconstruction.
    Returns:
        (W_new (d_out, d_in) float32 with pruned entries exactly 0, mask (d_out, d_in) bool, info:
        relative errors ||(W - W_new) X||^2 / ||W X||^2 ``error_final`` / ``error_warmstart`` /
        ``error_wanda`` (Wanda's mask on the same inputs), ``error_before_reconstruct``, the
        method's counters, ``timings`` (seconds per part) and ``seconds``).
    Raises:
        SparseFWError: unknown method or option, pattern not dividing d_in, non-finite input,
        Cholesky failure.
    """
    t0 = time.perf_counter()
    m = get_method(method)
    opts = m.resolve(options or {})
    stats = LayerStats.from_gram(W, G, percdamp)
    timings = {"reporting": time.perf_counter() - t0}          # seconds per part (scripts/bench_prune.py)
    res = m.fn(W, stats, pattern, **opts)
    info = {"iterations": 0, "fw_gap": 0.0, "chosen": method, **res.info}
    timings.update(info.pop("timings", {}))
    mask, W_new, err_final = res.mask, res.weight, info.pop("error_final", None)
    if res.weight is not None:
        err_final = None                                      # new weights: measured below
    t1 = time.perf_counter()
    if "error_wanda" not in info:
        info["error_wanda"] = reconstruction_error(W, stats.Gf, select(wanda_scores(W, stats.col_norms), pattern)) \
            / stats.dense_norm
    info.setdefault("error_warmstart", info["error_wanda"])
    timings["reporting"] += time.perf_counter() - t1
    if W_new is None:
        W_new = W * mask
    if reconstruct and not m.updates_weights:
        from .reconstruct import reconstruct_weights

        info["error_before_reconstruct"] = err_final if err_final is not None else \
            reconstruction_error(W, stats.Gf, mask) / stats.dense_norm
        t1 = time.perf_counter()
        W_new = reconstruct_weights(W, G, mask, percdamp=percdamp).float() * mask
        timings["reconstruction"] = time.perf_counter() - t1
        err_final = None
    t1 = time.perf_counter()
    info["error_final"] = weight_error(W, stats.Gf, W_new) / stats.dense_norm if err_final is None else err_final
    before = info.get("error_before_reconstruct")
    if before is not None and info["error_final"] > before:   # safeguard: CG is inexact (float32)
        W_new, info["error_final"] = W * mask, before
    timings["reporting"] += time.perf_counter() - t1
    timings["solve"] = time.perf_counter() - t0 - sum(timings.values())
    info["timings"] = timings
    info["seconds"] = time.perf_counter() - t0
    return W_new, mask, info


def expert_fallback(W: torch.Tensor, G: torch.Tensor, pattern: Pattern, tokens: int) -> tuple[torch.Tensor, dict]:
    """The rule for an expert that received fewer calibration tokens than ``--min-expert-tokens``:
    magnitude pruning (the one criterion that needs no activations). Errors are measured on the
    tokens it did receive, and are 0 (not measured) when it received none.

    Args: W: (d_out, d_in) float32. G: (d_in, d_in) Gram matrix of its routed tokens. pattern: as
        :func:`sparsefw.methods.solve_layer`. tokens: calibration tokens routed to the expert.
    Returns: (W_new (d_out, d_in) float32, info for :class:`sparsefw.report.LayerReport`)."""
    if tokens > 0 and bool(torch.diagonal(G).gt(0).any()):
        W_new, _, info = solve_layer(W, G, pattern, "magnitude")
    else:
        W_new = W * select(magnitude_scores(W), pattern)
        info = {"error_warmstart": 0.0, "error_final": 0.0, "error_wanda": 0.0, "chosen": "magnitude"}
    info.update(tokens=tokens, fallback="magnitude")
    return W_new, info
