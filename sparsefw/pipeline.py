"""Sequential layerwise pruning of a causal LM: the block driver (model plumbing; the methods are
in :mod:`sparsefw.methods`, the capture of calibration statistics in :mod:`sparsefw.capture`).

As in Wanda and SparseGPT: capture the inputs of the first decoder block, then for each block
hook its Linear layers to accumulate the Gram matrices G = X X^T, choose every layer's mask
(and weights), apply them, and recompute the block's outputs with the pruned weights as the next
block's inputs. Embeddings and the LM head stay dense. Peak memory: the model plus one block's
calibration activations (nsamples × seqlen × hidden floats) and the block's Gram matrices.
"""
from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import calibration_windows
from .capture import accumulate_grams, block_forward, capture_block_inputs, check_finite, full_names, layer_groups
from .config import PruneConfig
from .distributed import (Ranks, assign_owners, broadcast_object, broadcast_tensor_, layer_cost, raise_if_any,
                          reduce_sum_, window_range)
from .errors import SparseFWError
from .expert_drop import drop_block_experts, set_config_experts, shrink_like_saved
from .experts import ExpertLinear
from .gram import factor_dtype
from .masks import Pattern, parse_pattern, wanda_scores
from .methods import expert_fallback, get_method, solve_layer
from .models import decoder_blocks, get_weight, prunable_layers, resolve_device, set_weight, unknown_parameters
from .onload import Float32OnCpu, on_device, place_embeddings
from .owl import outlier_ratio, owl_sparsities
from .report import LayerReport, prune_summary


def check_prunable(model: nn.Module, pattern: Pattern, skip_unknown: bool = False) -> list[str]:
    """Check that the pattern applies to every prunable layer before any work is done.

    Args: model: the causal LM. pattern: the parsed pattern. skip_unknown: leave weights of unknown
        form (:func:`sparsefw.models.unknown_parameters`) dense instead of failing.
    Returns the full names of the prunable layers (expert slices as ``...down_proj[e]``).
    Raises SparseFWError: N:M not dividing some d_in, no Linear layers found, or (without
    ``skip_unknown``) parameters of 2+ dimensions in a block that no prunable layer covers.
    """
    names = full_names(model)
    out, unknown = [], []
    for block in decoder_blocks(model):
        for _, layer in prunable_layers(block).items():
            W = get_weight(layer)
            pattern.check_shape(tuple(W.shape), names[id(layer)])
            out.append(names[id(layer)])
        unknown += unknown_parameters(block, names[id(block)])
    if not out:
        raise SparseFWError(f"no Linear layers found in the decoder blocks of {type(model).__name__}")
    if unknown and not skip_unknown:
        raise SparseFWError(f"{len(unknown)} weights of the decoder blocks are of a form sparsefw cannot prune yet "
                            f"(e.g. {unknown[0]}, shape {tuple(model.get_parameter(unknown[0]).shape)}); pass "
                            "--skip-unknown to leave them dense (they are listed in the report)")
    return out


def _solve_mine(layers: dict, groups: list[list[str]], sums: dict, owner: dict, pattern: Pattern, cfg: PruneConfig,
                ranks: Ranks) -> dict:
    """Solve and set the layers of the groups this rank owns, one group at a time: G evaluated once
    per group (shared by q/k/v, gate/up), freed with the group's integer sum once its layers are
    solved; for methods that set weights (SparseGPT) and for reconstruction in
    :func:`sparsefw.gram.factor_dtype` (float64, float32 above d_in 16384), else in float32.
    {name: info}. Raises SparseFWError on every rank."""
    infos, error = {}, None
    factors = get_method(cfg.method).updates_weights or cfg.reconstruct
    for group in groups:
        if owner[group[0]] != ranks.rank:
            continue
        d_in = get_weight(layers[group[0]]).shape[1]
        tokens = sums[group[0]].tokens
        G = sums.pop(group[0]).evaluate(factor_dtype(d_in) if factors else torch.float32)
        try:
            for lname in group:
                layer = layers[lname]
                W = get_weight(layer).float().clone()
                if isinstance(layer, ExpertLinear) and tokens < int(cfg.min_expert_tokens):
                    W_new, infos[lname] = expert_fallback(W, G, pattern, tokens)
                else:
                    W_new, _, infos[lname] = solve_layer(W, G, pattern, cfg.method, cfg.options, cfg.reconstruct,
                                                         float(cfg.percdamp))
                    if isinstance(layer, ExpertLinear):
                        infos[lname]["tokens"] = tokens
                set_weight(layer, W_new)
                del W_new, W
        except SparseFWError as e:
            error = e
            break
        del G
    raise_if_any(error, ranks)
    return infos


def _prune_layers(block: nn.Module, groups: list[list[str]], inps: list, extra, pattern: Pattern, cfg: PruneConfig,
                  ranks: Ranks, names: dict, timer: dict) -> list[LayerReport]:
    """Sum the Gram matrices of the layer ``groups`` (lists of layers sharing one input) of
    ``block`` on the block's current weights, reduce each onto the group's owner, solve and set
    the layers, and broadcast the results. Returns the layers' reports (the same on every rank).
    Raises SparseFWError (on every rank) as :func:`sparsefw.methods.solve_layer` and
    :func:`sparsefw.capture.accumulate_grams` do."""
    rep = {n: g[0] for g in groups for n in g}
    layers = {n: l for n, l in prunable_layers(block).items() if n in rep}
    t1, g0 = time.perf_counter(), timer["gram"]
    sums = accumulate_grams(block, inps, extra, groups, names, ranks, timer)
    timer["calibration_forward"] += time.perf_counter() - t1 - (timer["gram"] - g0)
    owner = assign_owners({g[0]: sum(layer_cost(get_weight(layers[n]).shape) for n in g) for g in groups},
                          ranks.world)
    for g in groups:                          # one reduction per group, in the same order on every rank
        for t in sums[g[0]].tensors():
            reduce_sum_(t, owner[g[0]], ranks)
        if owner[g[0]] != ranks.rank:
            del sums[g[0]]
    infos = _solve_mine(layers, groups, sums, owner, pattern, cfg, ranks)
    reports = []
    for lname, layer in layers.items():
        broadcast_tensor_(layer.weight.data, owner[rep[lname]], ranks)
        info = broadcast_object(infos.get(lname), owner[rep[lname]], ranks)
        reports.append(LayerReport.from_info(names[id(layer)], list(get_weight(layer).shape), info))
    return reports


@torch.no_grad()
def owl_outlier_ratios(blocks, inps: list, extra: list, cfg: PruneConfig, ranks: Ranks, names: dict,
                       block_context=None, progress: bool = True) -> list[float]:
    """OWL's dense pre-pass: every block's outlier ratio D (:func:`sparsefw.owl.outlier_ratio`)
    from the Wanda scores |W| ||X_j|| of its Linear layers on the dense model's calibration
    activations (Yin et al., ICML 2024, Sec. 3).

    Args: blocks: the decoder blocks. inps: the first block's calibration inputs (this rank's,
        not modified). extra: per-block (args, kwargs). cfg: for ``owl_m`` and the device.
        ranks: the input norms are summed over ranks exactly (as the Gram matrices). names: module
        id -> full name. block_context: as in
        :func:`prune_model`, called with ``write=False``.
    Returns: one D per block, the same on every rank.
    Raises: SparseFWError on NaN/Inf activations (on every rank).
    """
    ratios = []
    for bi, block in enumerate(tqdm(blocks, desc="OWL outlier ratios", unit="block",
                                    disable=not (progress and ranks.is_main))):
        ctx = block_context(bi, block, write=False) if block_context else on_device(block, ranks.device)
        with ctx:
            outs, layers = [], prunable_layers(block)
            sums = accumulate_grams(block, inps, extra[bi], [[n] for n in layers], names, ranks, diagonal=True,
                                    outputs=outs)
            ratio = None
            for n in layers:                                                   # ||X_j||^2 on rank 0
                for t in sums[n].tensors():
                    reduce_sum_(t, 0, ranks)
            if ranks.is_main:
                scores = [wanda_scores(get_weight(l).float(), sums[n].evaluate(torch.float32).clamp_min(0).sqrt())
                          for n, l in layers.items()]
                ratio = outlier_ratio(scores, float(cfg.owl_m))
            ratios.append(broadcast_object(ratio, 0, ranks))
            inps = outs
    return ratios


def _prune_block(block: nn.Module, inps: list, extra, pattern: Pattern, cfg: PruneConfig, ranks: Ranks, names: dict,
                 timer: dict) -> list[LayerReport]:
    """Prune every layer of one block (true-sequential: group by group, each group fitted to the
    block's inputs with the earlier groups pruned); the layers' reports."""
    groups = layer_groups(block, inps, extra, ranks)
    if not cfg.true_sequential:
        return _prune_layers(block, groups, inps, extra, pattern, cfg, ranks, names, timer)
    done = []
    for group in groups:
        done += _prune_layers(block, [group], inps, extra, pattern, cfg, ranks, names, timer)
    return done


def _block_outputs(block: nn.Module, bi: int, inps: list, extra, device, store, ranks: Ranks) -> list:
    """The pruned block's outputs on every input (the next block's inputs), kept on ``store``.
    Raises SparseFWError (on every rank) on NaN/Inf outputs."""
    new_inps, error = [], None
    try:
        for h in inps:
            o = block_forward(block, h.to(device), extra)
            check_finite(o, f"block {bi + 1} (output of block {bi})")
            new_inps.append(o.to(store))
    except SparseFWError as e:
        error = e
    raise_if_any(error, ranks)
    return new_inps


def _owl_patterns(blocks, inps, extra, cfg: PruneConfig, ranks: Ranks, names, block_context, progress,
                  timer: dict) -> tuple[list[Pattern], dict]:
    """OWL's per-block patterns and the report's ``owl`` entry (M, lambda, ratios, sparsities)."""
    t1 = time.perf_counter()
    ratios = owl_outlier_ratios(blocks, inps, extra, cfg, ranks, names, block_context, progress)
    sps = owl_sparsities(ratios, float(cfg.sparsity), float(cfg.owl_lambda))
    timer["owl_prepass"] = time.perf_counter() - t1
    return ([parse_pattern(cfg.pattern, sp) for sp in sps],
            {"m": float(cfg.owl_m), "lambda": float(cfg.owl_lambda), "outlier_ratios": ratios, "block_sparsities": sps})


def _drop_experts(model, block, resumed: bool, inps, extra, cfg: PruneConfig, ranks: Ranks, names: dict,
                  mine: range, total: int, dropped: dict) -> None:
    """``--drop-experts`` (if set) on one block before it is pruned (:mod:`sparsefw.expert_drop`): REAP removes
    the experts (recorded in ``dropped`` under the block's name) and ``names`` learns the kept
    experts' layers; a block resumed from the run state is only shrunk to the saved expert count."""
    k = int(cfg.drop_experts)
    if k == 0:
        return
    if resumed:
        shrink_like_saved(block, k)
        return
    dropped[names[id(block)]] = drop_block_experts(block, inps, extra, k, mine.start, total, ranks)
    names.update(full_names(model))


@torch.no_grad()
def prune_model(model: nn.Module, tokenizer, cfg: PruneConfig, windows: torch.Tensor | None = None,
                progress: bool = True, ranks: Ranks | None = None, block_context=None,
                pattern: Pattern | None = None, state=None, after_capture=None) -> dict:
    """Prune a causal LM in place, block by block (Wanda/SparseGPT sequential scheme).

    One block at a time is moved to the device (:mod:`sparsefw.onload`); several processes (``ranks``) share the
    work as :mod:`sparsefw.distributed` describes, with the same masks and weights as one process. ``cfg.owl``:
    a dense pre-pass sets every block's sparsity (:func:`owl_outlier_ratios`). ``cfg.true_sequential``: the
    layer groups are pruned in the order the block runs them, each on inputs with the earlier groups pruned.
    ``cfg.drop_experts``: REAP removes whole experts of every MoE block first (:func:`_drop_experts`).

    Args: model: a Hugging Face causal LM, any dtype, on the CPU or the device. tokenizer: its tokenizer.
        cfg: the run. windows: optional (nsamples, seqlen) int64 calibration tokens (default: from
        ``cfg.calib`` with ``cfg.seed`` and ``cfg.bos``). progress: tqdm bar. ranks: the processes (default one).
        block_context: ``f(index, block, write=True)`` -> context manager around the work on one block
        (default :func:`sparsefw.onload.on_device`; streaming reads and writes blocks). pattern: the parsed
        pattern if the caller ran ``cfg.validate()`` and :func:`check_prunable`. state: a
        :class:`sparsefw.resume.RunState` (``--resume``). after_capture: ``f()`` once the first block's inputs
        are captured (streaming drops the embeddings).
    Returns: :func:`sparsefw.report.prune_summary` plus ``owl``, ``calibration_tokens``, ``unpruned_unknown``,
        ``processes``, ``resumed_blocks``, ``block_seconds`` (per block, streamed reads and writes included),
        ``dropped_experts`` ({block: {experts module: dropped, scores}}), ``experts_config`` (new counts or None).
    Raises: SparseFWError: bad configuration, N:M not dividing some d_in, short calibration text,
        NaN/Inf activations (on every rank, whichever rank found it).
    """
    t0 = time.perf_counter()
    if pattern is None:
        pattern = cfg.validate()
        check_prunable(model, pattern, cfg.skip_unknown)
    ranks = ranks or Ranks(0, 1, resolve_device(cfg.device))
    windows = windows if windows is not None else calibration_windows(
        tokenizer, cfg.calib, int(cfg.nsamples), int(cfg.seqlen), int(cfg.seed), bos=cfg.bos)
    model.eval()
    device, blocks, names = ranks.device, decoder_blocks(model), full_names(model)
    store = torch.device("cpu") if cfg.offload_activations else device
    home = model.get_input_embeddings().weight.device
    place_embeddings(model, blocks, device)
    mine = window_range(windows.shape[0], ranks)
    t1 = time.perf_counter()
    inps, extra = capture_block_inputs(model, blocks, windows[list(mine)], store)
    if after_capture is not None:
        after_capture()
    timer = {"calibration_forward": time.perf_counter() - t1, "gram": 0.0}   # seconds per part
    patterns, owl = [pattern] * len(blocks), None
    if cfg.owl:
        patterns, owl = _owl_patterns(blocks, inps, extra, cfg, ranks, names, block_context, progress, timer)
    reports: list[LayerReport] = []
    bar = tqdm(list(enumerate(blocks)), desc=f"{cfg.method} {pattern if pattern.kind == 'nm' else cfg.sparsity}",
               unit="block", disable=not (progress and ranks.is_main))
    resumed, block_seconds, dropped = 0, [], {}
    experts_config = set_config_experts(model, int(cfg.drop_experts)) if cfg.drop_experts else None
    for bi, block in bar:
        tb = time.perf_counter()
        with block_context(bi, block) if block_context else on_device(block, device):   # one block on the device
            saved = state.finished(bi) if state is not None else None
            with Float32OnCpu(block, device) as compute:
                _drop_experts(model, block, saved is not None, inps, extra[bi], cfg, ranks, names, mine,
                              windows.shape[0], dropped)
                if saved is not None:             # pruned before an interruption: its weights as they were
                    block.load_state_dict(saved)
                    done, resumed = state.reports(bi), resumed + 1
                else:
                    done = _prune_block(block, inps, extra[bi], patterns[bi], cfg, ranks, names, timer)
                compute.round()                   # the next block sees the weights as they will be saved
                t1 = time.perf_counter()
                inps = _block_outputs(block, bi, inps, extra[bi], device, store, ranks)
                timer["calibration_forward"] += time.perf_counter() - t1
            if state is not None and saved is None:
                state.save(bi, block, done)
        reports += done
        block_seconds.append(time.perf_counter() - tb)
        bar.set_postfix(err=f"{sum(r.error_final for r in done) / len(done):.4f}",
                        wanda=f"{sum(r.error_wanda for r in done) / len(done):.4f}")
    if model.get_input_embeddings().weight.device.type != "meta":
        place_embeddings(model, blocks, home)   # the model ends where it started
    return {**prune_summary(reports, timer, t0), "owl": owl, "calibration_tokens": int(windows.numel()),
            "unpruned_unknown": [u for b in blocks for u in unknown_parameters(b, names[id(b)])],
            "processes": ranks.world, "resumed_blocks": resumed, "block_seconds": block_seconds,
            "dropped_experts": {b: i for b, i in dropped.items() if i}, "experts_config": experts_config}
