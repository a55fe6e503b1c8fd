"""Layerwise pruning of a CNN with the LLM engine (model plumbing; the math is sparsefw's).

The pipeline idea of :mod:`sparsefw.pipeline` on the layers of a ``nn.Sequential`` CNN: run
calibration images through the network layer by layer; at every conv and linear layer accumulate
the Gram matrix G = X X^T of its inputs (a convolution is the matrix W (c_out, c_in kh kw) applied
to the im2col patches of its input, ``torch.nn.functional.unfold``), choose the layer's mask by
minimizing ||W X - (M ⊙ W) X||_F^2 with the engine, set the pruned weights, and propagate the
pruned layer's output to the next layer (so every layer is fitted to the inputs the pruned earlier
layers produce). Each layer keeps a given number k_l of weights (``per-matrix`` pattern: the count
of the global-magnitude mask, so that only the choice of weights differs between methods).

Methods (the LLM engine's registry, :mod:`sparsefw.methods`, called with the per-matrix pattern):
* ``sparsefw``: the registry's ``sparsefw`` (warmstart magnitude or Wanda, alpha trick, FW with
  exact line search over the per-matrix polytope, rounding, never worse than the warmstart, then
  exact 1-swaps within each row, so the layer count stays k_l). Source: SparseFW, arXiv
  2510.13713, Algorithm 1 and Eq. 2.
* ``sparsefw+rec``: the same mask, then the least-squares update of the kept weights
  (``reconstruct=True`` of :func:`sparsefw.methods.solve_layer`).
* ``sparsegpt``: the registry's ``sparsegpt`` (Frantar & Alistarh 2023, Algorithm 1; OBS
  updates), per-matrix budget.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsefw.errors import SparseFWError
from sparsefw.fw import dense_output_norm, reconstruction_error, weight_error
from sparsefw.gram import all_finite
from sparsefw.masks import Pattern, magnitude_scores, select
from sparsefw.methods import solve_layer

LAYERWISE_METHODS = ("sparsefw", "sparsefw+rec", "sparsegpt")


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The inputs X of a layer as rows, so that the layer's output (without bias) is X W^T.

    Args:
        module: ``nn.Linear`` or ``nn.Conv2d`` (groups = 1). x: its input, (B, d_in) for Linear,
            (B, C, H, W) for Conv2d (any memory format), float.
    Returns:
        (tokens, d_in) float32: Linear: x itself; Conv2d: the im2col patches (B * H_out * W_out,
        C kh kw), in the order of ``conv.weight.view(c_out, -1)``.
    Raises:
        SparseFWError: another layer type, or a grouped convolution.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).float()
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str):
            raise SparseFWError(f"layerwise pruning supports convolutions with groups=1 and numeric padding, "
                                f"got groups={module.groups}, padding={module.padding!r}")
        cols = F.unfold(x.float().contiguous(), module.kernel_size, dilation=module.dilation,
                        padding=module.padding, stride=module.stride)          # (B, C kh kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise SparseFWError(f"layerwise pruning handles nn.Linear and nn.Conv2d, not {type(module).__name__}")


def layer_gram(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """G = X^T X (d_in, d_in) float64 of the layer's inputs (:func:`layer_inputs`), so that
    ||W X||^2 = trace(W G W^T) for the layer's matrix W (c_out, d_in)."""
    X = layer_inputs(module, x).double()
    G = X.t() @ X
    if not all_finite(G):
        raise SparseFWError("NaN/Inf in the calibration activations; check the checkpoint and the images")
    return G


def prune_layer(W: torch.Tensor, G: torch.Tensor, kept: int, method: str, warmstart: str = "magnitude",
                alpha: float = 0.5, iterations: int = 100, swaps: int = 50) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One layer: keep exactly ``kept`` weights of W (c_out, d_in) chosen by ``method``.

    Args:
        W: (c_out, d_in) float weights. G: (d_in, d_in) float64 Gram matrix of its inputs.
        kept: weights to keep in the matrix (0 <= kept <= numel). method: see LAYERWISE_METHODS.
        warmstart: ``magnitude`` or ``wanda`` (sparsefw). alpha: fraction of the warmstart fixed.
        iterations: FW iterations. swaps: rounds of exact 1-swaps within rows after FW
            (:func:`sparsefw.swaps.swap_refine`; 0 = off).
    Returns:
        (W_new (c_out, d_in) float32 with pruned entries 0, mask (c_out, d_in) bool, info with
        the relative errors ||(W - W_new) X||^2 / ||W X||^2 of the magnitude mask and the result).
    Raises:
        SparseFWError: unknown method/warmstart, bad count.
    """
    if method not in LAYERWISE_METHODS:
        raise SparseFWError(f"unknown layerwise method '{method}': use one of {', '.join(LAYERWISE_METHODS)}")
    if warmstart not in ("magnitude", "wanda"):
        raise SparseFWError(f"unknown warmstart '{warmstart}': use magnitude or wanda")
    W = W.detach().float()
    if not (0 <= kept <= W.numel()):
        raise SparseFWError(f"kept must be in [0, {W.numel()}] for a {tuple(W.shape)} layer, got {kept}")
    Gf = G.float()
    dense = max(dense_output_norm(W, Gf), 1e-300)
    if kept in (0, W.numel()):       # nothing to choose: the whole layer pruned (or kept)
        mask = torch.full(W.shape, kept > 0, dtype=torch.bool)
        err = weight_error(W, Gf, W * mask) / dense
        return W * mask, mask, {"error_magnitude": err, "error_final": err}
    pattern = Pattern("per-matrix", 1.0 - kept / W.numel())
    info = {"error_magnitude": reconstruction_error(W, Gf, select(magnitude_scores(W), pattern)) / dense}
    name = "sparsegpt" if method == "sparsegpt" else "sparsefw"
    opts = {} if name == "sparsegpt" else {"warmstart": warmstart, "alpha": alpha, "iterations": iterations,
                                           "swaps": swaps}
    W_new, mask, res = solve_layer(W, G, pattern, name, opts, reconstruct=method == "sparsefw+rec")
    info["error_final"] = res["error_final"]
    return W_new, mask, info


@torch.no_grad()
def prune_layerwise(model: nn.Sequential, x: torch.Tensor, kept: dict[str, int], method: str,
                    **solver) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Prune every conv/linear layer of a sequential CNN in order, in place, each fitted to the
    inputs the already-pruned earlier layers produce (the LLM pipeline's sequential scheme).

    Args:
        model: an ``nn.Sequential`` (e.g. :class:`cnn.models.PaperCNN`); evaluated in eval mode.
        x: (B, C, H, W) float32 calibration images. kept: parameter name ("3.weight") -> k_l.
        method: see LAYERWISE_METHODS. solver: :func:`prune_layer`'s keyword arguments.
    Returns:
        (masks: parameter name -> bool mask of the weight's shape, per-layer info dicts).
    Raises:
        SparseFWError: a prunable layer without a count, unsupported layers, NaN/Inf activations.
    """
    if not isinstance(model, nn.Sequential):
        raise SparseFWError("layerwise pruning walks an nn.Sequential model (like PaperCNN)")
    was = model.training
    model.eval()
    masks, infos = {}, []
    h = x
    for name, mod in model.named_children():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            pname = f"{name}.weight"
            if pname not in kept:
                raise SparseFWError(f"no kept count for layer {pname}")
            G = layer_gram(mod, h)
            W = mod.weight.reshape(mod.weight.shape[0], -1)    # (c_out, C kh kw), any memory format
            W_new, mask, info = prune_layer(W, G, int(kept[pname]), method, **solver)
            mod.weight.copy_(W_new.view(mod.weight.shape).to(mod.weight.dtype))
            masks[pname] = mask.view(mod.weight.shape)
            infos.append({"layer": pname, "kept": int(kept[pname]), **info})
        h = mod(h)
    model.train(was)
    return masks, infos
