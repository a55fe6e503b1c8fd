"""Tests of the CNN magnitude / FW / FW + momentum pruning (cnn/fw_pruning.py, cnn/train.py,
cnn/experiments.py). Hand-computed masks, exact-k checks, zero-preservation under fine-tuning and
a tiny end-to-end smoke run of the sweep (skipped when the MNIST files are not installed)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cnn import fw_pruning as fwp
from cnn.models import PaperCNN, prunable_parameters
from cnn.train import (SparseLinear, apply_masks, effective_weight_gradient, evaluate,
                       nonzero_fractions, train, with_sparse_linear)
from conftest import have_mnist, tiny_sweep_config
from sparsefw.errors import SparseFWError


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(2 * 13 * 13, 3))


def tiny_data(n: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 3, (n,), generator=g)


# ---------------------------------------------------------------- shared LMO / FW step / rounding
def test_fw_step_hand_computed():
    g = torch.tensor([[0.3, -0.5, 0.1, -0.2, 0.0]])
    m = torch.ones(1, 5)
    V = fwp.fw_step(m, g, k=2, eta=0.5)
    assert V.tolist() == [[False, True, False, True, False]]  # the two most negative entries
    assert torch.allclose(m, torch.tensor([[0.5, 1.0, 0.5, 1.0, 0.5]]))
    # a second step from there with eta = 2/(2+2) = 0.5
    V2 = fwp.fw_step(m, torch.tensor([[-1.0, 0.0, 0.0, 0.0, -2.0]]), k=2, eta=fwp.step_size(2))
    assert V2.tolist() == [[True, False, False, False, True]]
    assert torch.allclose(m, torch.tensor([[0.75, 0.5, 0.25, 0.5, 0.75]]))


def test_round_relaxed_ties_and_exact_k():
    m = torch.tensor([[0.5, 0.5, 1.0, 0.2, 0.5]])
    tie = torch.tensor([[1.0, 3.0, 0.0, 9.0, 2.0]])
    M = fwp.round_relaxed(m, 3, tie)
    # 1.0 first, then the 0.5s ordered by tiebreak: index 1 (3.0), index 4 (2.0)
    assert M.tolist() == [[False, True, True, False, True]]


def test_mask_gradient_sign_and_literal_reading():
    W = torch.tensor([[2.0, -1.0, 0.5]])
    gW = torch.tensor([[-1.0, -1.0, 4.0]])
    g = fwp.mask_gradient(W, gW, "mask")
    assert g.tolist() == [[-2.0, 1.0, 2.0]]
    m = torch.ones(1, 3)
    assert fwp.fw_step(m, g, 1, 1.0).tolist() == [[True, False, False]]
    lit = fwp.mask_gradient(W, gW, "literal")
    assert fwp.fw_step(torch.ones(1, 3), lit, 1, 1.0).tolist() == [[False, False, True]]  # top |grad|
    with pytest.raises(SparseFWError):
        fwp.mask_gradient(W, gW, "bogus")


def test_mask_gradient_is_first_order_loss_change_of_removal():
    """W ⊙ ∇L = dL/dm at m = 1; the weight with the most negative entry is the one whose removal
    raises the loss most (brute force on a loss far from its minimum, where first order is nearly
    exact; near a minimum the curvature term dominates, which is why the criterion is noisy on a
    trained network)."""
    torch.manual_seed(0)
    b = torch.randn(1, 6)
    W = torch.randn(1, 6).requires_grad_(True)
    loss = lambda w: (b * w).sum() + 0.01 * (w ** 2).sum()  # noqa: E731
    (gW,) = torch.autograd.grad(loss(W), W)
    g = fwp.mask_gradient(W.detach(), gW, "mask")
    m = torch.ones(1, 6, requires_grad=True)
    (gm,) = torch.autograd.grad(loss(W.detach() * m), m)
    assert torch.allclose(g, gm)
    incr = []
    for i in range(6):
        w = W.detach().clone()
        w[0, i] = 0
        incr.append(float(loss(w) - loss(W.detach())))
    assert int(torch.argmin(g)) == int(torch.tensor(incr).argmax())


def test_global_magnitude_mask_is_global_not_per_layer():
    w = {"a": torch.tensor([[0.1, -5.0], [0.2, 0.3]]), "b": torch.tensor([4.0, -3.0, 0.05])}
    M = fwp.global_magnitude_mask(w, sparsity=3 / 7)  # keep round(4/7*7) = 4
    assert M["a"].tolist() == [[False, True], [False, True]]
    assert M["b"].tolist() == [True, True, False]
    with pytest.raises(SparseFWError):
        fwp.global_magnitude_mask(w, 1.0)


def test_schedule_and_ema():
    assert fwp.sparsity_schedule(0.5, 0.9, 5) == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert fwp.sparsity_schedule(0.5, 0.9, 1) == [0.9]
    cub = fwp.sparsity_schedule(0.5, 0.9, 3, "cubic")
    assert cub == pytest.approx([0.5, 0.9 - 0.4 * 0.125, 0.9])
    with pytest.raises(SparseFWError):
        fwp.sparsity_schedule(0.9, 0.5, 3)
    g = torch.tensor([[3.0, -1.0]])
    assert torch.allclose(fwp.ema_update(None, g, 0.9), 0.1 * g)
    assert fwp.ema_update(torch.tensor([[1.0, 1.0]]), g, 0.5).tolist() == [[2.0, 0.0]]
    with pytest.raises(SparseFWError):
        fwp.ema_update(g, g, 1.0)


def test_flatten_roundtrip():
    w = prunable_parameters(PaperCNN())
    flat = fwp.flatten(w)
    assert flat.shape == (1, 34720)
    back = fwp.unflatten(flat, w)
    assert all(torch.equal(back[k], w[k].detach()) for k in w)
    with pytest.raises(SparseFWError):
        fwp.unflatten(flat[:, :-1], w)


# ---------------------------------------------------------------- plumbing on a tiny model
def test_effective_weight_gradient_matches_autograd():
    model = tiny_model()
    x, y = tiny_data()
    W = prunable_parameters(model)
    ones = {k: torch.ones_like(v) for k, v in W.items()}
    g = effective_weight_gradient(model, ones, x, y, batch_size=10)
    model.eval()
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for k, v in W.items():
        assert torch.allclose(g[k], v.grad, atol=1e-6)
    half = {k: torch.full_like(v, 0.5) for k, v in W.items()}
    g2 = effective_weight_gradient(model, half, x, y)
    assert not torch.allclose(g2["0.weight"], g["0.weight"])  # evaluated at W ⊙ m, not W


@pytest.mark.parametrize("momentum,schedule,init", [(0.0, [0.8], "ones"), (0.9, [0.5, 0.8], "ones"),
                                                    (0.0, [0.8], "magnitude")])
def test_fw_prune_keeps_exactly_k(momentum, schedule, init):
    model = tiny_model()
    x, y = tiny_data(48)
    W = prunable_parameters(model)
    n = sum(v.numel() for v in W.values())
    gen = torch.Generator().manual_seed(0)
    kept = []

    def grad_fn(m):
        Wc = prunable_parameters(model)
        idx = torch.randint(0, 48, (16,), generator=gen)
        g = effective_weight_gradient(model, fwp.unflatten(m, Wc), x[idx], y[idx])
        return fwp.flatten(Wc), fwp.flatten(g)

    def finetune(M, level):
        masks = {k: v.clone() for k, v in fwp.unflatten(M, W).items()}
        train(model, x, y, steps=2, lr=0.1, batch_size=16, generator=gen, masks=masks)
        kept.append(int(M.sum()))

    res = fwp.fw_prune(grad_fn, finetune, n, schedule, iterations=3, momentum=momentum, init=init,
                       weights_fn=lambda: fwp.flatten(prunable_parameters(model)))
    ks = [fwp.kept_count(n, s) for s in schedule]
    assert kept == ks
    assert int(res.mask.sum()) == ks[-1]
    nz = sum(int((p != 0).sum()) for p in prunable_parameters(model).values())
    assert nz <= ks[-1]  # exactly k unless a kept weight is itself exactly zero
    assert nz >= ks[-1] - 2
    assert not bool((fwp.flatten(prunable_parameters(model)) != 0)[~res.mask].any())


def test_finetune_keeps_pruned_weights_exactly_zero():
    model = tiny_model()
    x, y = tiny_data(64)
    masks = fwp.global_magnitude_mask(prunable_parameters(model), 0.7)
    before = {k: v.detach().clone() for k, v in prunable_parameters(model).items()}
    train(model, x, y, steps=6, lr=0.5, momentum=0.9, batch_size=16,
          generator=torch.Generator().manual_seed(1), masks=masks)
    for k, v in prunable_parameters(model).items():
        assert bool((v[~masks[k]] == 0).all())
        assert not torch.equal(v[masks[k]], before[k][masks[k]])  # kept weights did train
    nz_p, nz_a = nonzero_fractions(model)
    assert nz_p == pytest.approx(0.3, abs=2e-3)
    assert 0.3 < nz_a < 1.0


def test_sparse_linear_and_evaluate():
    model = tiny_model()
    x, y = tiny_data(20)
    apply_masks(model, fwp.global_magnitude_mask(prunable_parameters(model), 0.9))
    sp = with_sparse_linear(model)
    assert isinstance(sp[4], SparseLinear)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(sp(x), model(x), atol=1e-5)
    acc, loss = evaluate(model, x, y, batch_size=7)
    with torch.no_grad():
        out = model(x)
    assert acc == pytest.approx(float((out.argmax(1) == y).float().mean()))
    assert loss == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-5)
    with pytest.raises(SparseFWError):
        evaluate(model, x, y[:5])


# ---------------------------------------------------------------- smoke test of the sweep
@pytest.mark.skipif(not have_mnist(), reason="MNIST not installed (bash scripts/setup.sh)")
def test_quick_config_smoke(tmp_path):
    from cnn.experiments import run_sweep
    cfg = tiny_sweep_config("configs/cnn_mnist_quick.yaml", tmp_path)
    cfg["prune"].update(subsample=32, fw_iterations=2, ramp_steps=2, ramp_iterations=1)
    cfg["latency"] = {"examples": 3, "repeats": 1}
    cfg["main"]["budgets"] = [1]
    cfg["ablations"]["variants"] = {"fw_momentum_mu0": {"momentum": 0.0}}
    cfg["sparsity_sweep"].update(budget=1, sparsities=[0.7], methods=["fw_momentum"])
    cfg["fashion"] = None
    s = run_sweep(cfg, tmp_path / "out", progress=False)
    runs = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 3 + 1 + 1
    for r in runs:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["nonzero_prunable"] <= 1 - r["sparsity"] + 1e-3
    assert (tmp_path / "out" / "fig1_accuracy_loss_vs_budget.png").exists()
    assert s["acceptance"]["dense_1epoch_accuracy"] is not None
    # resuming does not redo finished runs
    run_sweep(cfg, tmp_path / "out", progress=False)
    assert len((tmp_path / "out" / "runs.jsonl").read_text().splitlines()) == 5
