"""Sequential layerwise pruning of a causal LM (model plumbing; the math is in masks/fw).

As in Wanda and SparseGPT: capture the inputs of the first decoder block, then for each block
hook its Linear layers to accumulate the Gram matrices G = X X^T, choose every layer's mask
(and weights), apply them, and recompute the block's outputs with the pruned weights as the next
block's inputs. Embeddings and the LM head stay dense. Peak memory: the model plus one block's
calibration activations (nsamples × seqlen × hidden floats) and the block's Gram matrices.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import BOS_MODES, calibration_windows
from .errors import SparseFWError
from .fw import FIX_MODES, STEP_RULES, dense_output_norm, fw_solve, reconstruction_error, weight_error
from .masks import Pattern, magnitude_scores, parse_pattern, ria_scores, select, wanda_scores
from .models import decoder_blocks, get_weight, prunable_layers, resolve_device, resolve_dtype, set_weight
from .distributed import (GRAM_CHUNK, Ranks, assign_layers, broadcast_object, broadcast_tensor_, raise_if_any,
                          reduce_gram, two_sum_, window_range)
from .onload import capture_block_inputs, module_device, on_device, place_embeddings
from .owl import check_owl_lambda, outlier_ratio, owl_sparsities

METHODS = ("magnitude", "wanda", "ria", "sparsefw", "sparsegpt")
WARMSTARTS = ("wanda", "ria", "magnitude")


@dataclass
class PruneConfig:
    """Everything that defines a pruning run (the CLI flags and YAML keys have the same names).

    Defaults: alpha / fix / step / tol / iterations were chosen by the measurements in the
    README (alpha sweep, step-rule comparison); calibration 128 × 1024 windows of the offline
    ``wiki`` text (139k tokens; the literature's 128 × 2048 on C4 needs ``--calib c4`` online).
    """

    method: str = "sparsefw"
    sparsity: float | None = None  # None: 0.5, or 1 - N/M for an N:M pattern (set by validate)
    pattern: str = "unstructured"
    warmstart: str = "wanda"
    alpha: float = 0.9         # best validation (Austen) perplexity of the alpha sweep with --iterations 30 (README); the paper's value
    fix: str = "row"           # "row" | "group" (N:M only); row measured better at 2:4 (README)
    iterations: int = 0        # FW iterations before the swaps: they paid <= 0.2% layer error at 2-5x the solve time (README, Solver)
    step: str = "linesearch"   # vanilla FW with a per-row exact line search (pairwise measured slower to converge)
    tol: float = 1e-2          # a row stops when its FW gap <= tol * (its warmstart error)
    swaps: int = 50            # rounds of exact swap refinement (0 = the FW/warmstart mask as is): sparsefw/swaps.py
    reconstruct: bool = False
    percdamp: float = 0.01
    blocksize: int = 128
    calib: str = "wiki"
    nsamples: int = 128
    seqlen: int = 1024
    seed: int = 0
    bos: str = "auto"          # BOS at the start of every calibration window / ppl chunk (calibration.bos_token_id)
    device: str = "auto"       # where blocks run and layers are solved: auto (CUDA if present) | cpu | cuda[:N]
    dtype: str = "auto"        # model dtype: auto (the checkpoint's) | float32 | bfloat16 | float16
    offload_activations: bool = False  # keep calibration activations on the CPU between blocks
    owl: bool = False          # OWL per-block sparsities (Yin et al., ICML 2024), mean = sparsity: sparsefw/owl.py
    owl_m: float = 5.0         # OWL's M: a Wanda score > M x the block's mean score is an outlier
    owl_lambda: float = 0.08   # OWL's lambda: block sparsities span 2 lambda around the target
    true_sequential: bool = False  # fit each layer group to the inputs of the block with the earlier groups pruned

    def validate(self) -> Pattern:
        """Check every field; return the parsed pattern. Raises SparseFWError with what to do."""
        if self.method not in METHODS:
            raise SparseFWError(f"unknown method '{self.method}': use one of {', '.join(METHODS)}")
        if self.warmstart not in WARMSTARTS:
            raise SparseFWError(f"unknown warmstart '{self.warmstart}': use one of {', '.join(WARMSTARTS)}")
        if self.step not in STEP_RULES:
            raise SparseFWError(f"unknown step rule '{self.step}': use one of {', '.join(STEP_RULES)}")
        if self.fix not in FIX_MODES:
            raise SparseFWError(f"unknown fix mode '{self.fix}': use row or group")
        try:
            alpha = float(self.alpha)
        except (TypeError, ValueError):
            alpha = float("nan")
        if math.isnan(alpha) or not (0.0 <= alpha <= 1.0):
            raise SparseFWError(f"alpha must be in [0, 1] (fraction of warmstart weights fixed), got {self.alpha!r}")
        if int(self.iterations) < 0:
            raise SparseFWError(f"iterations must be >= 0, got {self.iterations}")
        if int(self.swaps) < 0:
            raise SparseFWError(f"swaps must be >= 0 (rounds of swap refinement; 0 = off), got {self.swaps}")
        try:
            tol = float(self.tol)
        except (TypeError, ValueError):
            tol = float("nan")
        if not math.isfinite(tol) or tol < 0:
            raise SparseFWError(f"tol must be a number >= 0 (FW gap relative to the warmstart error, e.g. 0.01), "
                                f"got {self.tol!r}")
        resolve_device(self.device)
        resolve_dtype(self.dtype)
        if self.bos not in BOS_MODES:
            raise SparseFWError(f"unknown BOS mode '{self.bos}': use one of {', '.join(BOS_MODES)}")
        if int(self.nsamples) < 1 or int(self.seqlen) < 2:
            raise SparseFWError(f"nsamples must be >= 1 and seqlen >= 2, got {self.nsamples} and {self.seqlen}")
        if self.owl:
            if str(self.pattern) != "unstructured":
                raise SparseFWError(f"--owl sets one sparsity per block for --pattern unstructured; the pattern "
                                    f"'{self.pattern}' fixes the sparsity of every row or matrix (drop --owl)")
            try:
                owl_m = float(self.owl_m)
            except (TypeError, ValueError):
                owl_m = float("nan")
            if not (math.isfinite(owl_m) and owl_m > 0):
                raise SparseFWError(f"--owl-m must be a number > 0 (OWL uses 5), got {self.owl_m!r}")
        if ":" in str(self.pattern):
            pat = parse_pattern(self.pattern)
            if self.sparsity is not None and abs(float(self.sparsity) - pat.sparsity) > 1e-9:
                raise SparseFWError(f"the N:M pattern {pat} fixes the sparsity at {pat.sparsity:.0%}; "
                                    f"drop --sparsity {self.sparsity} (or use --pattern unstructured)")
            self.sparsity = pat.sparsity
            return pat
        if self.sparsity is None:
            self.sparsity = 0.5
        pat = parse_pattern(self.pattern, self.sparsity)
        if self.owl:
            check_owl_lambda(float(self.sparsity), float(self.owl_lambda))
        return pat

    def report_fields(self) -> dict:
        """The fields as a report dict; the SparseFW-only ones are None for the other methods."""
        d = asdict(self)
        if self.method != "sparsefw":
            for k in ("warmstart", "alpha", "fix", "iterations", "step", "tol", "swaps"):
                d[k] = None
        if not self.owl:
            d["owl_m"] = d["owl_lambda"] = None
        return d

    def fix_mode(self, pattern: Pattern) -> str:
        """The alpha fixing mode for ``pattern``: ``group`` applies to N:M only, else ``row``."""
        return self.fix if pattern.kind == "nm" else "row"


@dataclass
class LayerReport:
    """Per-layer outcome. Errors are relative: ||(W - W_hat) X||^2 / ||W X||^2 on this layer's
    calibration inputs (the inputs produced by the already-pruned earlier blocks)."""

    name: str
    shape: list
    error_warmstart: float
    error_final: float
    error_wanda: float
    iterations: int = 0
    fw_gap: float = 0.0
    chosen: str = ""
    error_before_reconstruct: float | None = None
    seconds: float = 0.0
    at_cap: int = 0
    swaps: int = 0
    error_before_swaps: float | None = None
    timings: dict = field(default_factory=dict)


def _iteration_summary(its: list) -> dict:
    """Mean, p50, p90 and max of the layers' FW iterations (the longest row of each layer)."""
    if not its:
        return {"mean": 0.0, "p50": 0, "p90": 0, "max": 0}
    s = sorted(its)
    return {"mean": sum(s) / len(s), "p50": s[len(s) // 2], "p90": s[min(len(s) - 1, int(0.9 * len(s)))],
            "max": s[-1]}


def _timings(timer: dict, reports: list, total: float) -> dict:
    """Seconds per part of a prune: calibration forward, Gram accumulation (this process), the
    layers' warmstart / FW iterations / rounding / swaps / reconstruction / solve (the method's
    own work) / reporting (errors for the report), and the rest (reductions, placement)."""
    out = dict(timer)
    for r in reports:
        for k, v in r.timings.items():
            out[k] = out.get(k, 0.0) + v
    out["other"] = max(total - sum(out.values()), 0.0)
    return out


def _block_forward(block, h, extra):
    args, kw = extra
    out = block(h, *args, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_finite(x: torch.Tensor, where: str):
    if not torch.isfinite(x).all():
        raise SparseFWError(f"NaN/Inf in the activations entering {where}; the model's weights or "
                            "the calibration text produce non-finite values (check the checkpoint, "
                            "use float32)")


def solve_layer(W: torch.Tensor, G: torch.Tensor, pattern: Pattern, cfg: PruneConfig):
    """Choose the mask (and weights) of one layer with the configured method.

    Args:
        W: (d_out, d_in) float32 weights. G: (d_in, d_in) float64 Gram matrix of its inputs, on
        W's device (every solver computes there: float32 for masks and FW, float64 for SparseGPT
        and the least-squares reconstruction).
        pattern: parsed sparsity pattern. cfg: the run configuration.
    Returns:
        (W_new (d_out, d_in) float32 with pruned entries exactly 0, mask (d_out, d_in) bool,
        info dict with the LayerReport fields except name/shape).
    Raises:
        SparseFWError: from the solvers (pattern does not divide d_in, non-finite input).
    """
    t0 = time.perf_counter()
    Gf = G.float()
    col_norms = torch.diagonal(G).clamp_min(0).sqrt().float()
    wanda = wanda_scores(W, col_norms)
    scores_of = {"magnitude": lambda: magnitude_scores(W), "wanda": lambda: wanda,
                 "ria": lambda: ria_scores(W, col_norms)}
    t1 = time.perf_counter()
    denom = max(dense_output_norm(W, Gf), 1e-300)
    timings = {"reporting": time.perf_counter() - t1}      # seconds per part (scripts/bench_prune.py)
    err_wanda = None
    info = {"iterations": 0, "fw_gap": 0.0, "chosen": cfg.method}
    W_new = None
    err_final = None                                         # known without another GEMM
    if cfg.method == "sparsegpt":
        from .sparsegpt_sparsify import sparsegpt_prune

        W_new, mask = sparsegpt_prune(W, G, pattern, blocksize=cfg.blocksize, percdamp=cfg.percdamp)
    elif cfg.method == "sparsefw":
        res = fw_solve(W, Gf, scores_of[cfg.warmstart](), pattern, alpha=float(cfg.alpha),
                       iterations=int(cfg.iterations), step=cfg.step, tol=float(cfg.tol),
                       fix=cfg.fix_mode(pattern), swaps=int(cfg.swaps), dense_norm=denom)
        mask = res.mask
        info.update(iterations=res.iterations, fw_gap=res.fw_gap, chosen=res.chosen,
                    error_warmstart=res.error_warmstart, at_cap=res.at_cap, swaps=res.swaps,
                    error_before_swaps=res.error_before_swaps)
        timings.update(warmstart=res.setup_seconds, fw_iterations=res.loop_seconds, swaps=res.swap_seconds,
                       rounding=res.seconds - res.setup_seconds - res.loop_seconds - res.swap_seconds)
        if cfg.warmstart == "wanda":
            err_wanda = res.error_warmstart                  # the warmstart is Wanda's mask
        err_final = res.error_final
    else:
        mask = select(scores_of[cfg.method](), pattern)
        info["error_warmstart"] = err_final = reconstruction_error(W, Gf, mask) / denom
        if cfg.method == "wanda":
            err_wanda = err_final
    if err_wanda is None:
        t1 = time.perf_counter()
        err_wanda = reconstruction_error(W, Gf, select(wanda, pattern)) / denom
        timings["reporting"] += time.perf_counter() - t1
    info["error_wanda"] = err_wanda
    info.setdefault("error_warmstart", err_wanda)
    if W_new is None:
        W_new = W * mask
    if cfg.reconstruct and cfg.method != "sparsegpt":
        from .reconstruct import reconstruct_weights

        info["error_before_reconstruct"] = err_final
        t1 = time.perf_counter()
        W_new = reconstruct_weights(W, G, mask, percdamp=cfg.percdamp).float() * mask
        timings["reconstruction"] = time.perf_counter() - t1
        err_final = None
    t1 = time.perf_counter()
    info["error_final"] = weight_error(W, Gf, W_new) / denom if err_final is None else err_final
    before = info.get("error_before_reconstruct")
    if before is not None and info["error_final"] > before:   # safeguard: CG is inexact (float32)
        W_new, info["error_final"] = W * mask, before
    timings["reporting"] = timings.get("reporting", 0.0) + time.perf_counter() - t1
    timings["solve"] = time.perf_counter() - t0 - sum(timings.values())
    info["timings"] = timings
    info["seconds"] = time.perf_counter() - t0
    return W_new, mask, info


class _StopForward(Exception):
    """Raised by a hook once every layer asked for has seen its input (the rest of the block's
    forward is not needed)."""


@torch.no_grad()
def accumulate_gram_pairs(block: nn.Module, inps: list, extra, names: dict | None = None,
                          first: int = 0, chunk: int = GRAM_CHUNK, timer: dict | None = None,
                          layers: list[str] | None = None, diagonal: bool = False,
                          outputs: list | None = None) -> dict:
    """Run a block on its calibration inputs and accumulate its Linear layers' Gram matrices.

    G = sum over calibration tokens of x x^T, computed per sample in float32 and summed in float64
    (SOLVER_NOTES: float32 alone differs from float64 by ~1e-7 relative): plainly within chunks of
    ``chunk`` consecutive windows, then the chunk sums as an unevaluated pair hi + lo with
    error-free additions (:mod:`sparsefw.distributed`), so that several processes holding
    different chunks round to the same G. Layers that read the same input tensor (q/k/v,
    gate/up) share one product per sample and one accumulator.

    Args:
        block: a decoder block (on the compute device). inps: list of (1, seqlen, hidden) inputs
            (any device; each is moved to the block's for its forward). extra: the block's
            (args, kwargs) from :func:`capture_block_inputs`. names: module id -> full name (errors).
        first: global index of ``inps[0]`` among all calibration windows (chunks are global).
        chunk: windows per plain float64 chunk (:data:`sparsefw.distributed.GRAM_CHUNK`).
        timer: optional dict; its ``"gram"`` entry is increased by the seconds spent in the
            Gram products (the rest of the call is the block's forward).
        layers: names (within the block) of the layers to accumulate; default all. Unless
            ``outputs`` is given, each window's forward stops once all of them have run
            (true-sequential pruning, :func:`prune_model`).
        diagonal: accumulate only diag(G) = ||X_j||^2 per input feature (OWL's pre-pass).
        outputs: if a list, the block's (1, seqlen, hidden) outputs are appended to it (on each
            input's device).
    Returns: {layer name within the block: (hi, lo)}, two float64 tensors, (d_in, d_in) (or
        (d_in,) with ``diagonal``) on the layer's device (the same tensor objects for layers that
        share an input).
    Raises: SparseFWError on NaN/Inf activations.
    """
    layers = {n: l for n, l in prunable_layers(block).items() if layers is None or n in layers}
    group: dict[str, str] = {}        # layer -> first layer reading the same input (window 0)
    acc: dict[str, list] = {}         # group -> [chunk sum, hi, lo]
    seen: dict = {}                   # this window: id(x) -> (x, group)
    ran: set = set()                  # this window: layers that have run

    def make_hook(lname):
        def hook(mod, inp, out):
            x = inp[0]
            ran.add(lname)
            stop = outputs is None and len(ran) == len(layers)
            # Same tensor object as an earlier layer's input (q/k/v, gate/up)? The cache holds a
            # reference to x, so its id cannot be reused by a later tensor while cached (keying by
            # data_ptr() was wrong: a freed input's address is reused by the next one).
            hit = seen.get(id(x))
            if hit is not None and hit[0] is x:
                group.setdefault(lname, hit[1])
            else:
                g = group.setdefault(lname, lname)
                seen[id(x)] = (x, g)
                t = time.perf_counter()
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                _check_finite(x2, f"layer {(names or {}).get(id(mod), lname)}")
                inc = (x2 * x2).sum(0).double() if diagonal else (x2.t() @ x2).double()
                if g not in acc:
                    acc[g] = [inc, torch.zeros_like(inc), torch.zeros_like(inc)]
                else:
                    acc[g][0] += inc
                if timer is not None:
                    timer["gram"] = timer.get("gram", 0.0) + time.perf_counter() - t
            if stop:
                raise _StopForward
        return hook

    handles = [l.register_forward_hook(make_hook(n)) for n, l in layers.items()]
    dev = module_device(block)
    try:
        for j, h in enumerate(inps):
            seen.clear()
            ran.clear()
            try:
                o = _block_forward(block, h.to(dev), extra)
                if outputs is not None:
                    outputs.append(o.to(h.device))
            except _StopForward:
                pass
            if (first + j + 1) % chunk == 0 or j == len(inps) - 1:   # end of a (global) chunk
                for c, hi, lo in acc.values():
                    two_sum_(hi, lo, c)
                    c.zero_()
    finally:
        for hd in handles:
            hd.remove()
    for n, l in layers.items():
        if n not in group:   # a layer that never ran (no windows on this rank)
            d = get_weight(l).shape[1]
            z = torch.zeros((d,) if diagonal else (d, d), dtype=torch.float64, device=get_weight(l).device)
            acc[n] = [z, z, z.clone()]
            group[n] = n
    return {n: (acc[group[n]][1], acc[group[n]][2]) for n in layers}


def accumulate_grams(block: nn.Module, inps: list, extra, names: dict | None = None) -> dict:
    """{layer name within the block: (d_in, d_in) float64 G on the layer's device}: the Gram
    matrices of :func:`accumulate_gram_pairs`, evaluated (hi + lo). Raises as it does."""
    return {n: hi + lo for n, (hi, lo) in accumulate_gram_pairs(block, inps, extra, names).items()}


def _full_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def check_prunable(model: nn.Module, pattern: Pattern) -> list[str]:
    """Check that the pattern applies to every prunable layer before any work is done.

    Returns the full names of the prunable layers. Raises SparseFWError (N:M not dividing d_in,
    no Linear layers found).
    """
    names = _full_names(model)
    out = []
    for block in decoder_blocks(model):
        for _, layer in prunable_layers(block).items():
            W = get_weight(layer)
            pattern.check_shape(tuple(W.shape), names[id(layer)])
            out.append(names[id(layer)])
    if not out:
        raise SparseFWError(f"no Linear layers found in the decoder blocks of {type(model).__name__}")
    return out


def _layer_groups(block: nn.Module, inps: list, extra, ranks: Ranks) -> list[list[str]]:
    """The block's Linear layers in the order its forward runs them, grouped by shared input
    (Llama: [q, k, v], [o], [gate, up], [down]); found on one window of the last rank (which
    always holds windows) and broadcast, so that every rank uses the same groups."""
    src = ranks.world - 1
    groups: list[list[str]] = []
    if ranks.rank == src:
        last: list = [None]

        def make_hook(lname):
            def hook(mod, inp, out):
                if groups and inp[0] is last[0]:
                    groups[-1].append(lname)
                else:
                    groups.append([lname])
                    last[0] = inp[0]
            return hook

        handles = [l.register_forward_hook(make_hook(n)) for n, l in prunable_layers(block).items()]
        try:
            _block_forward(block, inps[0].to(module_device(block)), extra)
        finally:
            for hd in handles:
                hd.remove()
        seen: set = set()
        groups = [[n for n in g if not (n in seen or seen.add(n))] for g in groups]   # first run only
        groups = [g for g in groups if g]
        missing = [n for n in prunable_layers(block) if n not in seen]
        if missing:
            groups.append(missing)                # layers the forward did not run: last, together
    return broadcast_object(groups, src, ranks)


def _prune_layers(block: nn.Module, group: list[str], inps: list, extra, pattern: Pattern, cfg: PruneConfig,
                  ranks: Ranks, names: dict, first: int, timer: dict) -> list[LayerReport]:
    """Accumulate the Gram matrices of the layers ``group`` of ``block`` on the current weights of
    the block, reduce them onto the layers' owners, solve and set the layers, and broadcast the
    results. Returns the layers' reports (the same on every rank). Raises SparseFWError (on every
    rank) as :func:`solve_layer` and :func:`accumulate_gram_pairs` do."""
    layers = {n: l for n, l in prunable_layers(block).items() if n in group}
    error = None
    try:
        t1, g0 = time.perf_counter(), timer["gram"]
        pairs = accumulate_gram_pairs(block, inps, extra, names, first=first, timer=timer, layers=list(layers))
        timer["calibration_forward"] += time.perf_counter() - t1 - (timer["gram"] - g0)
    except SparseFWError as e:
        pairs, error = None, e
    raise_if_any(error, ranks)
    owner = assign_layers({n: tuple(get_weight(l).shape) for n, l in layers.items()}, ranks.world)
    # one reduction per layer, in the same order on every rank (a rank without windows
    # does not know which layers share an input, so no sharing here)
    grams = {n: reduce_gram(*pairs.pop(n), owner[n], ranks) for n in layers}
    infos, error = {}, None
    for lname, layer in layers.items():
        if owner[lname] != ranks.rank:
            continue
        try:
            W_new, mask, infos[lname] = solve_layer(get_weight(layer).float().clone(), grams.pop(lname),
                                                    pattern, cfg)
            set_weight(layer, W_new)
        except SparseFWError as e:
            error = e
            break
    raise_if_any(error, ranks)
    del grams
    reports = []
    for lname, layer in layers.items():
        broadcast_tensor_(layer.weight.data, owner[lname], ranks)
        info = broadcast_object(infos.get(lname), owner[lname], ranks)
        reports.append(LayerReport(name=names[id(layer)], shape=list(get_weight(layer).shape), **info))
    return reports


@torch.no_grad()
def owl_outlier_ratios(blocks, inps: list, extra: list, cfg: PruneConfig, ranks: Ranks, names: dict,
                       first: int = 0, block_context=None, progress: bool = True) -> list[float]:
    """OWL's dense pre-pass: every block's outlier ratio D (:func:`sparsefw.owl.outlier_ratio`)
    from the Wanda scores |W| ||X_j|| of its Linear layers on the dense model's calibration
    activations (Yin et al., ICML 2024, Sec. 3).

    Args: blocks: the decoder blocks. inps: the first block's calibration inputs (this rank's,
        not modified). extra: per-block (args, kwargs). cfg: for ``owl_m`` and the device.
        ranks: the input norms are summed over ranks exactly (as the Gram matrices). names: module
        id -> full name. first: global index of ``inps[0]``. block_context: as in
        :func:`prune_model`, called with ``write=False``.
    Returns: one D per block, the same on every rank.
    Raises: SparseFWError on NaN/Inf activations (on every rank).
    """
    ratios = []
    for bi, block in enumerate(tqdm(blocks, desc="OWL outlier ratios", unit="block",
                                    disable=not (progress and ranks.is_main))):
        ctx = block_context(bi, block, write=False) if block_context else on_device(block, ranks.device)
        with ctx:
            outs, error = [], None
            try:
                pairs = accumulate_gram_pairs(block, inps, extra[bi], names, first=first, diagonal=True,
                                              outputs=outs)
            except SparseFWError as e:
                error = e
            raise_if_any(error, ranks)
            ratio = None
            layers = prunable_layers(block)
            norms = {n: reduce_gram(*pairs[n], 0, ranks) for n in layers}     # ||X_j||^2 on rank 0
            if ranks.is_main:
                scores = [wanda_scores(get_weight(l).float(), norms[n].clamp_min(0).sqrt().float())
                          for n, l in layers.items()]
                ratio = outlier_ratio(scores, float(cfg.owl_m))
            ratios.append(broadcast_object(ratio, 0, ranks))
            inps = outs
    return ratios


@torch.no_grad()
def prune_model(model: nn.Module, tokenizer, cfg: PruneConfig, windows: torch.Tensor | None = None,
                progress: bool = True, ranks: Ranks | None = None, block_context=None) -> dict:
    """Prune a causal LM in place, block by block (Wanda/SparseGPT sequential scheme).

    One block at a time is moved to ``cfg.device`` (sequential onloading, :mod:`sparsefw.onload`);
    with several processes (``ranks``) the work is shared as :mod:`sparsefw.distributed` describes,
    with the same masks and weights as one process. ``cfg.owl``: a dense pre-pass first sets every
    block's sparsity (:func:`owl_outlier_ratios`, :mod:`sparsefw.owl`). ``cfg.true_sequential``:
    within a block the layer groups (q/k/v, o, gate/up, down) are pruned in the order the block
    runs them, each fitted to the inputs the block produces with the earlier groups already
    pruned (the SparseGPT/GPTQ reference scripts' ``--true-sequential``); by default every layer's
    Gram matrix comes from one pass of the block as it enters (dense within the block).

    Args:
        model: a Hugging Face causal LM, any dtype, on the CPU or the compute device (the weights
            keep their dtype; each layer is solved in float32/float64 on the compute device).
            tokenizer: its tokenizer.
        cfg: the run configuration (validated here).
        windows: optional (nsamples, seqlen) int64 calibration tokens (default: drawn from
            ``cfg.calib`` with ``cfg.seed``, starting with BOS as ``cfg.bos`` says).
        progress: show a tqdm bar over blocks (main process only).
        ranks: this process's :class:`sparsefw.distributed.Ranks` (default: one process on
            ``cfg.device``).
        block_context: ``f(index, block, write=True)`` -> a context manager around the work on one
            block (``write=False`` for OWL's read-only pre-pass)
            (default :func:`sparsefw.onload.on_device`: onto the device and back; streaming
            reads the block from the checkpoint and writes it out, :mod:`sparsefw.streaming`).
    Returns:
        dict with ``layers`` (list of LayerReport dicts), ``seconds``, summary means
        (``mean_error_final``, ``mean_error_wanda``, ``mean_error_warmstart``,
        ``error_reduction_vs_wanda`` = 1 - mean(final)/mean(wanda)), ``owl`` (None, or M, lambda,
        ``outlier_ratios`` and ``block_sparsities`` per block); the same on every rank.
    Raises:
        SparseFWError: bad configuration, N:M not dividing some d_in, short calibration text,
        NaN/Inf activations (on every rank, whichever rank found it).
    """
    t0 = time.perf_counter()
    pattern = cfg.validate()
    check_prunable(model, pattern)
    ranks = ranks or Ranks(0, 1, resolve_device(cfg.device))
    if windows is None:
        windows = calibration_windows(tokenizer, cfg.calib, int(cfg.nsamples), int(cfg.seqlen), int(cfg.seed),
                                      bos=cfg.bos)
    model.eval()
    device = ranks.device
    store = torch.device("cpu") if cfg.offload_activations else device
    blocks = decoder_blocks(model)
    names = _full_names(model)
    home = model.get_input_embeddings().weight.device
    place_embeddings(model, blocks, device)
    mine = window_range(windows.shape[0], ranks, GRAM_CHUNK)
    t1 = time.perf_counter()
    inps, extra = capture_block_inputs(model, blocks, windows[list(mine)], store)
    timer = {"calibration_forward": time.perf_counter() - t1, "gram": 0.0}   # seconds per part
    reports: list[LayerReport] = []
    bar = tqdm(list(enumerate(blocks)), desc=f"{cfg.method} {pattern if pattern.kind == 'nm' else cfg.sparsity}",
               unit="block", disable=not (progress and ranks.is_main))
    patterns = [pattern] * len(blocks)
    owl = None
    if cfg.owl:
        t1 = time.perf_counter()
        ratios = owl_outlier_ratios(blocks, inps, extra, cfg, ranks, names, mine.start, block_context, progress)
        sps = owl_sparsities(ratios, float(cfg.sparsity), float(cfg.owl_lambda))
        patterns = [parse_pattern(cfg.pattern, sp) for sp in sps]
        owl = {"m": float(cfg.owl_m), "lambda": float(cfg.owl_lambda), "outlier_ratios": ratios,
               "block_sparsities": sps}
        timer["owl_prepass"] = time.perf_counter() - t1
    for bi, block in bar:
        layers = prunable_layers(block)
        ctx = block_context(bi, block) if block_context else on_device(block, device)
        with ctx:                             # sequential onloading: one block on the device
            groups = _layer_groups(block, inps, extra[bi], ranks) if cfg.true_sequential else [list(layers)]
            for group in groups:              # true-sequential: each group sees the earlier ones pruned
                reports += _prune_layers(block, group, inps, extra[bi], patterns[bi], cfg, ranks, names,
                                         mine.start, timer)
            new_inps, error = [], None
            t1 = time.perf_counter()
            try:
                for h in inps:
                    o = _block_forward(block, h.to(device), extra[bi])
                    _check_finite(o, f"block {bi + 1} (output of block {bi})")
                    new_inps.append(o.to(store))
            except SparseFWError as e:
                error = e
            raise_if_any(error, ranks)
            inps = new_inps
            timer["calibration_forward"] += time.perf_counter() - t1
        done = reports[-len(layers):]
        bar.set_postfix(err=f"{sum(r.error_final for r in done) / len(done):.4f}",
                        wanda=f"{sum(r.error_wanda for r in done) / len(done):.4f}")
    place_embeddings(model, blocks, home)   # the model ends where it started
    layers_out = [asdict(r) for r in reports]
    mf = sum(r.error_final for r in reports) / len(reports)
    mw = sum(r.error_wanda for r in reports) / len(reports)
    ms = sum(r.error_warmstart for r in reports) / len(reports)
    geo = math.exp(sum(math.log(max(r.error_final, 1e-30) / max(r.error_wanda, 1e-30)) for r in reports) / len(reports))
    return {"layers": layers_out, "seconds": time.perf_counter() - t0, "mean_error_final": mf,
            "mean_error_wanda": mw, "mean_error_warmstart": ms,
            "error_reduction_vs_wanda": 1.0 - mf / mw if mw > 0 else 0.0,
            "geomean_ratio_vs_wanda": geo,
            "layers_fw_kept": sum(1 for r in reports if r.chosen == "fw"),
            "fw_iterations": _iteration_summary([r.iterations for r in reports]),
            "layers_at_iteration_cap": sum(1 for r in reports if r.at_cap > 0),
            "swaps_applied": sum(r.swaps for r in reports),   # "swaps" is the config (rounds)
            "timings": _timings(timer, reports, time.perf_counter() - t0), "owl": owl,
            "calibration_tokens": int(windows.numel()), "processes": ranks.world}
