"""Stochastic Frank-Wolfe (SFW) training under per-tensor K-sparse polytope constraints.

* :class:`SFW` — the optimizer of Pokutta, Spiegel & Zimmer (2020, "Deep Neural Network Training
  with Frank-Wolfe", arXiv 2010.07243, Alg. 1 with momentum, Sec. 3.2 step-size rescaling), as
  used by SFW-pruning (Lu et al., ICLR 2022, "Learning Pruning-Friendly Networks via Frank-Wolfe",
  Alg. 1-2): per parameter tensor,

      d <- rho d + (1 - rho) g          (first step: d = g)
      v = LMO_C(d)                      (K-sparse polytope, :func:`cnn.ksparse.ksparse_lmo`)
      theta <- theta + gamma (v - theta),
      gamma = min(lr * ||d||_2 / ||v - theta||_2, 1)   ("gradient" rescaling) or gamma = lr.

  The update is a convex combination, so a feasible start stays feasible.
* :func:`ksparse_param_groups` — one parameter group per tensor (weights *and* biases) with
  K = max(k_min, k_frac * numel) and radius tau_box = tau * E||theta_0||_2 / sqrt(K), where
  E||theta_0||_2 comes from the layer's own initializer (:func:`expected_init_norms`, on a copy).
* :class:`SFWSchedule` — step decay plus the dynamic x0.7 / x1.06 rule on the 5- vs 10-epoch
  mean training loss (Pokutta et al. 2020, Sec. 4 "learning rate schedule").
* :func:`sfw_init` — SFW-Init (Lu et al. 2022, Alg. 3): GradInit-style per-tensor scales chosen so
  that one SFW step on a minibatch gives the lowest loss on an overlapping minibatch, then the
  tensors are scaled into C.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.func import functional_call

from sparsefw.errors import SparseFWError
from .ksparse import (in_ksparse, k_for, ksparse_feasible, ksparse_lmo, ksparse_norms,
                      radius_from_init)

RESCALE_MODES = ("gradient", "none")


# ----------------------------------------------------------------------------------------------
# Constraints from the model's initializer
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def expected_init_norms(model: nn.Module, repetitions: int = 20) -> dict[str, float]:
    """E||theta_0||_2 of every parameter under its own layer's initializer.

    Each leaf module that owns parameters and has ``reset_parameters()`` is deep-copied and
    re-initialized ``repetitions`` times; the L2 norms are averaged (Pokutta et al. 2020,
    ``get_avg_init_norm``). The model itself is untouched and the global RNG state is restored
    (``torch.random.fork_rng``), so training randomness does not depend on this call. A parameter
    whose module has no ``reset_parameters`` uses its current norm.

    Args: model: any nn.Module. repetitions: samples per module (>= 1).
    Returns: {parameter name: mean L2 norm (float, parameter units)} for every named parameter.
    Raises: SparseFWError: repetitions < 1.
    """
    if int(repetitions) < 1:
        raise SparseFWError(f"repetitions must be >= 1, got {repetitions}")
    out: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        for mname, mod in model.named_modules():
            own = dict(mod.named_parameters(recurse=False))
            if not own:
                continue
            prefix = f"{mname}." if mname else ""
            if hasattr(mod, "reset_parameters"):
                clone = copy.deepcopy(mod)
                sums = {n: 0.0 for n in own}
                for _ in range(int(repetitions)):
                    clone.reset_parameters()
                    for n, p in clone.named_parameters(recurse=False):
                        sums[n] += float(p.detach().double().norm())
                for n in own:
                    out[prefix + n] = sums[n] / int(repetitions)
            else:
                for n, p in own.items():
                    out[prefix + n] = float(p.detach().double().norm())
    return out


def ksparse_param_groups(model: nn.Module, k_frac: float = 0.05, k_min: int = 1,
                         tau: float = 15.0, repetitions: int = 20) -> list[dict]:
    """One SFW parameter group per tensor with its K-sparse polytope (weights and biases).

    K = max(k_min, k_frac * numel) (capped at numel) and radius = tau * E||theta_0||_2 / sqrt(K),
    i.e. the polytope's L2 diameter is 2 tau E||theta_0||_2 (Pokutta et al. 2020, Sec. 3.2;
    Lu et al. 2022 use k_frac = 5%, tau = 15).

    Args:
        model: the network (its parameters are not modified).
        k_frac, k_min: see :func:`cnn.ksparse.k_for`. tau: diameter multiplier (> 0).
        repetitions: initializer samples for E||theta_0||_2 (:func:`expected_init_norms`).
    Returns: list of dicts {"params": [p], "name": str, "K": int, "radius": float}, in
        ``model.named_parameters()`` order; pass it to :class:`SFW`.
    Raises: SparseFWError: bad k_frac / k_min / tau, or a parameter with zero expected norm.
    """
    norms = expected_init_norms(model, repetitions)
    groups = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        k = k_for(p.numel(), k_frac, k_min)
        try:
            r = radius_from_init(norms[name], k, tau)
        except SparseFWError as e:
            raise SparseFWError(f"parameter '{name}': {e}") from None
        groups.append({"params": [p], "name": name, "K": k, "radius": r})
    return groups


# ----------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------
class SFW(torch.optim.Optimizer):
    """Stochastic Frank-Wolfe with momentum over per-group K-sparse polytopes.

    Pokutta et al. 2020, Alg. 1 (momentum d <- rho d + (1 - rho) g, Sec. 3.2 "gradient" step
    rescaling gamma = min(lr ||d|| / ||v - theta||, 1)); Lu et al. 2022, Alg. 1-2.

    Args:
        params: parameter groups, each with keys ``K`` (int) and ``radius`` (float); build them
            with :func:`ksparse_param_groups`. A group may hold several tensors: each tensor gets
            its own polytope C(K, radius) and its own step size.
        lr: learning rate >= 0. For "none" it is gamma itself (use <= 1); for "gradient" it
            multiplies ||d|| / ||v - theta|| (and may exceed 1; gamma is clipped to [0, 1]).
        momentum: rho in [0, 1). rescale: "gradient" or "none".
    Raises:
        SparseFWError: missing K / radius, bad lr / momentum / rescale.

    The state (``momentum_buffer`` per tensor) and the groups' K / radius save and load with
    ``state_dict()`` / ``load_state_dict()``. Call :meth:`make_feasible` once before training.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, rescale: str = "gradient"):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise SparseFWError(f"SFW learning rate must be a finite number >= 0, got {lr!r}")
        if not (0.0 <= momentum < 1.0):
            raise SparseFWError(f"SFW momentum must be in [0, 1), got {momentum!r}")
        if rescale not in RESCALE_MODES:
            raise SparseFWError(f"unknown rescale '{rescale}': use one of {RESCALE_MODES}")
        super().__init__(params, dict(lr=lr, momentum=momentum, rescale=rescale))
        for g in self.param_groups:
            if "K" not in g or "radius" not in g:
                raise SparseFWError("every SFW parameter group needs 'K' and 'radius'; build the "
                                    "groups with cnn.sfw.ksparse_param_groups(model)")
            for p in g["params"]:
                k_for(p.numel(), 1.0, 1)  # non-empty
                if not (1 <= int(g["K"]) <= p.numel()):
                    raise SparseFWError(f"group '{g.get('name', '?')}': K = {g['K']} is not in "
                                        f"[1, {p.numel()}]")
                if not (g["radius"] > 0 and math.isfinite(g["radius"])):
                    raise SparseFWError(f"group '{g.get('name', '?')}': radius must be > 0")

    @torch.no_grad()
    def make_feasible(self) -> None:
        """Scale every tensor radially into its polytope (:func:`ksparse_feasible`), in place."""
        for g in self.param_groups:
            for p in g["params"]:
                p.copy_(ksparse_feasible(p, int(g["K"]), float(g["radius"])))

    @torch.no_grad()
    def is_feasible(self, rtol: float = 1e-5) -> bool:
        """True iff every tensor lies in its C(K, radius) up to ``rtol`` (:func:`in_ksparse`)."""
        return all(in_ksparse(p, int(g["K"]), float(g["radius"]), rtol)
                   for g in self.param_groups for p in g["params"])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One SFW step on every tensor with a gradient. Returns the closure's loss (or None)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            rho, lr = g["momentum"], g["lr"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if rho > 0:
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = p.grad.detach().clone()
                    else:
                        st["momentum_buffer"].mul_(rho).add_(p.grad, alpha=1.0 - rho)
                    d = st["momentum_buffer"]
                else:
                    d = p.grad
                v = ksparse_lmo(d, int(g["K"]), float(g["radius"]))
                if g["rescale"] == "gradient":
                    dist = float(torch.linalg.vector_norm(v - p))
                    gamma = lr * float(torch.linalg.vector_norm(d)) / dist if dist > 0 else 0.0
                else:
                    gamma = lr
                gamma = max(0.0, min(gamma, 1.0))
                st["gamma"] = gamma
                p.mul_(1.0 - gamma).add_(v, alpha=gamma)
        return loss


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule
# ----------------------------------------------------------------------------------------------
def dynamic_lr_factor(epoch_losses: list[float], short: int = 5, long: int = 10,
                      down: float = 0.7, up: float = 1.06) -> float:
    """The dynamic rule of Pokutta et al. 2020 (Sec. 4): compare recent mean training losses.

    Args: epoch_losses: mean training loss of each finished epoch (oldest first).
        short, long: window lengths (5 and 10). down, up: the factors (0.7 and 1.06).
    Returns: 1.0 until ``long`` epochs exist; then ``down`` if mean(last short) >= mean(last long)
        (the loss stalls or rises), else ``up``.
    """
    if len(epoch_losses) < long:
        return 1.0
    s = sum(epoch_losses[-short:]) / short
    lg = sum(epoch_losses[-long:]) / long
    return down if s >= lg else up


class SFWSchedule:
    """Step decay (x ``gamma`` at each milestone epoch) times the dynamic x0.7 / x1.06 rule.

    Call :meth:`epoch_end` once per epoch with the epoch's mean training loss (average over its
    batches). Works for any optimizer with ``param_groups[*]["lr"]``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: Iterable[int] = (),
                 gamma: float = 0.1, dynamic: bool = True):
        self.optimizer, self.milestones, self.gamma = optimizer, sorted(int(m) for m in milestones), gamma
        self.dynamic, self.losses, self.epoch = dynamic, [], 0

    def epoch_end(self, mean_loss: float) -> float:
        """Record the loss, update every group's lr; returns the combined factor applied."""
        self.epoch += 1
        self.losses.append(float(mean_loss))
        f = self.gamma if self.epoch in self.milestones else 1.0
        if self.dynamic:
            f *= dynamic_lr_factor(self.losses)
        for g in self.optimizer.param_groups:
            g["lr"] *= f
        return f

    def state_dict(self) -> dict:
        """Epoch counter and loss history (for checkpointing)."""
        return {"epoch": self.epoch, "losses": list(self.losses)}

    def load_state_dict(self, sd: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.epoch, self.losses = int(sd["epoch"]), list(sd["losses"])


# ----------------------------------------------------------------------------------------------
# SFW-Init
# ----------------------------------------------------------------------------------------------
def sfw_init(model: nn.Module, groups: list[dict], batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
             lr: float, iters: int = 100, adam_lr: float = 1e-3, min_scale: float = 0.01,
             grad_clip: float = 1.0, loss_fn: Callable = nn.functional.cross_entropy) -> dict:
    """SFW-Init (Lu et al. 2022, Alg. 3; GradInit, Zhu et al. 2021): learn one scale per tensor.

    Each tensor is parametrized as alpha_i * theta0_i (alpha_i = 1 at the start). Per iteration,
    with three minibatches A, B, C from ``batches``: the loss on A ∪ B gives gradients g_i
    (kept in the graph); one SFW step theta'_i = theta_i + gamma_i (v_i - theta_i) with
    v_i = LMO(g_i) and gamma_i = min(lr ||g_i|| / ||v_i - theta_i||, 1) is taken; the loss on the
    overlapping batch A ∪ C at theta' divided by lr is minimized over alpha with Adam (gradient
    norm clipped to ``grad_clip``; weights keep alpha >= min_scale, biases alpha >= 0). Dropout is
    off during the search (model.eval()). Finally the tensors are set to alpha_i theta0_i and
    scaled into their polytopes (:func:`cnn.ksparse.ksparse_feasible`).

    Args:
        model: the network, modified in place. groups: from :func:`ksparse_param_groups`
            (one tensor per group). batches: an endless iterator of (x, y) minibatches.
        lr: the SFW learning rate of the first training step. iters: Adam iterations (>= 0).
        adam_lr, min_scale, grad_clip: as in GradInit / Lu et al.'s code (1e-3, 0.01, 1).
        loss_fn: (logits, y) -> scalar loss.
    Returns: {"scales": {name: alpha}, "loss_before": float, "loss_after": float} where the
        losses are the mean one-step-ahead objectives of the first and last 10 iterations.
    Raises: SparseFWError: a group holds more than one tensor, or iters < 0.
    """
    if int(iters) < 0:
        raise SparseFWError(f"iters must be >= 0, got {iters}")
    if any(len(g["params"]) != 1 for g in groups):
        raise SparseFWError("sfw_init needs one tensor per group (use ksparse_param_groups)")
    pid = {id(p): n for n, p in model.named_parameters()}
    names = [pid[id(g["params"][0])] for g in groups]
    theta0 = {n: g["params"][0].detach().clone() for n, g in zip(names, groups)}
    is_bias = {n: theta0[n].dim() < 2 for n in names}
    alpha = {n: torch.ones((), dtype=theta0[n].dtype, requires_grad=True) for n in names}
    opt = torch.optim.Adam(list(alpha.values()), lr=adam_lr)
    was_training = model.training
    model.eval()
    hist = []
    for _ in range(int(iters)):
        (xa, ya), (xb, yb), (xc, yc) = next(batches), next(batches), next(batches)
        theta = {n: alpha[n] * theta0[n] for n in names}
        loss0 = loss_fn(functional_call(model, theta, (torch.cat([xa, xb]),)), torch.cat([ya, yb]))
        grads = torch.autograd.grad(loss0, [theta[n] for n in names], create_graph=True)
        stepped = {}
        for n, g, grp in zip(names, grads, groups):
            v = ksparse_lmo(g.detach(), int(grp["K"]), float(grp["radius"]))
            gamma = (lr * torch.linalg.vector_norm(g)
                     / torch.linalg.vector_norm(v - theta[n]).clamp_min(1e-12)).clamp(0.0, 1.0)
            stepped[n] = theta[n] + gamma * (v - theta[n])
        loss1 = loss_fn(functional_call(model, stepped, (torch.cat([xa, xc]),)), torch.cat([ya, yc]))
        obj = loss1 / max(lr, 1e-12)
        opt.zero_grad()
        obj.backward()
        torch.nn.utils.clip_grad_norm_(list(alpha.values()), grad_clip)
        opt.step()
        with torch.no_grad():
            for n in names:
                alpha[n].clamp_(min=0.0 if is_bias[n] else min_scale)
        hist.append(loss1.item())
    with torch.no_grad():
        for n, grp in zip(names, groups):
            p = grp["params"][0]
            p.copy_(ksparse_feasible(alpha[n].detach() * theta0[n], int(grp["K"]), float(grp["radius"])))
    model.train(was_training)
    first = hist[:10] or [float("nan")]
    last = hist[-10:] or [float("nan")]
    return {"scales": {n: alpha[n].item() for n in names},
            "loss_before": sum(first) / len(first), "loss_after": sum(last) / len(last)}


__all__ = ["SFW", "SFWSchedule", "dynamic_lr_factor", "expected_init_norms", "ksparse_param_groups",
           "sfw_init", "ksparse_norms"]
