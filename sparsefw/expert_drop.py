"""Structured expert pruning of mixture-of-experts blocks: REAP (model plumbing).

REAP (router-weighted expert activation pruning; Lasby et al. 2025, "REAP the Experts: Why
Pruning Prevails for One-Shot MoE compression", arXiv 2510.13999, Eq. 9) scores expert j of a
block by the mean over the calibration tokens routed to it (its router top-k) of the routing weight
times the norm of the expert's output,

    S_j = (1 / |X_j|) * sum_{x in X_j} g_j(x) * ||f_j(x)||_2,

and removes the K experts of every block with the lowest S_j (an expert no calibration token
reached scores 0). The experts' fused 3-D weights, the router's rows (and DeepSeek's
score-correction bias) and the expert counts of the modules and the config shrink to E - K, so the
saved model loads with plain transformers. The routing of the remaining experts is unchanged (the
router's softmax / top-k now runs over the kept experts only).

Scores are summed per calibration window and the windows added in their order on every process,
so one and several processes choose the same experts.
"""
from __future__ import annotations

import torch
from torch import nn

from .capture import block_forward
from .distributed import Ranks, broadcast_tensor_, reduce_sum_
from .errors import SparseFWError
from .experts import forget_layers, is_fused_experts, is_router, routed_experts

COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
"""Names of an expert count, on transformers' MoE modules and configs."""


def reap_scores(block: nn.Module, inps: list[torch.Tensor], extra, first: int, total: int,
                ranks: Ranks) -> dict[str, torch.Tensor]:
    """REAP saliency of every expert of every fused experts module of ``block`` (module docstring).

    Args: block: a decoder block on its compute device. inps: this process's calibration windows'
        block inputs, each (1, seqlen, d); ``first``: the index of inps[0] among all ``total``
        windows. extra: the block's captured (args, kwargs).
    Returns: {experts module name in the block: (E,) float64 S_j}; the same bits on every process.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    mods = {n: m for n, m in block.named_modules() if is_fused_experts(m)}
    for n, m in mods.items():
        E = m.down_proj.shape[0]
        sums[n] = torch.zeros(total, E, dtype=torch.float64)
        counts[n] = torch.zeros(total, E, dtype=torch.float64)
    w = [first]

    def observe(name, e, g, y):
        sums[name][w[0], e] += float((g.double() * y.double().norm(dim=-1)).sum())
        counts[name][w[0], e] += g.numel()

    with routed_experts(block, observe):
        for i, h in enumerate(inps):
            w[0] = first + i
            block_forward(block, h, extra)
    out = {}
    for n in mods:
        both = torch.stack([sums[n], counts[n]])          # each window on one process: exact sums
        reduce_sum_(both, 0, ranks)
        broadcast_tensor_(both, 0, ranks)
        s, c = both.sum(1)                                 # windows added in their order
        out[n] = torch.where(c > 0, s / c.clamp_min(1), 0.0)
    return out


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """The k experts with the lowest scores (ties: the lower index), sorted. scores: (E,)."""
    order = sorted(range(scores.numel()), key=lambda e: (float(scores[e]), e))
    return sorted(order[:k])


def remove_experts(moe: nn.Module, experts_name: str, drop: list[int]) -> int:
    """Remove experts ``drop`` from the experts module ``moe.<experts_name>`` and from the router
    next to it: every parameter and buffer whose first dimension is the expert count keeps the other
    experts' rows in order, and integer expert counts (:data:`COUNT_KEYS`) on the modules drop by
    len(drop). Returns the new expert count.
    Raises: SparseFWError if fewer experts would remain than the router's top-k."""
    experts = moe.get_submodule(experts_name)
    E = experts.down_proj.shape[0]
    keep = torch.tensor([e for e in range(E) if e not in set(drop)], dtype=torch.int64)
    routers = [m for n, m in moe.named_children() if is_router(n, m)]
    top_k = max([getattr(m, "top_k", 0) for m in [moe, *routers]] + [0])
    if keep.numel() < max(top_k, 1):
        raise SparseFWError(f"dropping {len(drop)} of {E} experts leaves {keep.numel()}, fewer than the router's "
                            f"top-k ({top_k}); use a smaller --drop-experts")
    for mod in [experts, *routers]:
        for n, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            if t.dim() >= 1 and t.shape[0] == E:
                new = t.data.index_select(0, keep.to(t.device))
                setattr(mod, n, nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new)
    for mod in [moe, experts, *routers]:
        for key in COUNT_KEYS:
            if getattr(mod, key, None) == E:
                setattr(mod, key, int(keep.numel()))
    forget_layers(experts)                 # its ExpertLinear views were per expert index
    return int(keep.numel())


def drop_block_experts(block: nn.Module, inps, extra, k: int, first: int, total: int, ranks: Ranks) -> dict:
    """REAP on one block: score its experts (:func:`reap_scores`) and remove the ``k`` lowest of
    every fused experts module (:func:`remove_experts`).
    Returns {experts module name: {"dropped": [expert indices], "scores": [S_j of all experts]}}."""
    info = {}
    for name, s in reap_scores(block, inps, extra, first, total, ranks).items():
        parent, _, leaf = name.rpartition(".")
        drop = lowest(s, k)
        remove_experts(block.get_submodule(parent) if parent else block, leaf, drop)
        info[name] = {"dropped": drop, "scores": [float(x) for x in s]}
    return info


def shrink_like_saved(block: nn.Module, k: int) -> None:
    """Remove the last ``k`` experts of every experts module of ``block``, so that the state dict of
    a block saved after :func:`drop_block_experts` loads into it (``--resume``)."""
    for name, m in [(n, m) for n, m in block.named_modules() if is_fused_experts(m)]:
        parent, _, leaf = name.rpartition(".")
        E = m.down_proj.shape[0]
        remove_experts(block.get_submodule(parent) if parent else block, leaf, list(range(E - k, E)))


def set_config_experts(model: nn.Module, k: int) -> dict:
    """Lower every expert count of ``model.config`` (:data:`COUNT_KEYS`) by ``k``, as ``k`` experts
    are dropped from every block. Returns {key: new count}.
    Raises: SparseFWError for a model without fused experts, or with DeepSeek-style expert groups
    (n_group > 1), which dropping would unbalance."""
    if not any(is_fused_experts(m) for m in model.modules()):
        raise SparseFWError(f"--drop-experts removes experts of mixture-of-experts blocks; "
                            f"{type(model).__name__} has none (drop --drop-experts)")
    config = model.config
    if getattr(config, "n_group", 1) not in (None, 1):
        raise SparseFWError(f"--drop-experts does not support grouped routing (n_group = {config.n_group}); "
                            "prune without --drop-experts")
    out = {key: getattr(config, key) - k for key in COUNT_KEYS if isinstance(getattr(config, key, None), int)}
    for key, v in out.items():              # read first: configs alias some names (Mixtral num_experts)
        setattr(config, key, v)
    return out
