"""CNN magnitude / FW / FW + momentum pruning (cnn/fw_pruning.py): hand-computed FW steps, rounding
and mask gradients, the global magnitude mask, schedules, exact-k pruning with fine-tuning in the
loop, and the warmstarted global FW with alpha-fixing and per-layer budgets (the LLM engine's
method on the CNN)."""
from __future__ import annotations

import pytest
import torch

from cnn import fw_pruning as fwp
from cnn.models import PaperCNN, prunable_parameters
from cnn.train import effective_weight_gradient, train
from sparsefw.errors import SparseFWError


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


@pytest.mark.parametrize("momentum,schedule,init", [(0.0, [0.8], "ones"), (0.9, [0.5, 0.8], "ones"),
                                                    (0.0, [0.8], "magnitude")])
def test_fw_prune_keeps_exactly_k(momentum, schedule, init, tiny_cnn, tiny_batch):
    model = tiny_cnn()
    x, y = tiny_batch(48)
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


def _fw_with(alpha, sizes, n=40, k=12, seed=0):
    torch.manual_seed(seed)
    W = torch.randn(1, n)

    def grad_fn(m):
        return W, torch.randn(1, n)          # any gradient: alpha = 1 leaves FW nothing to choose

    return W, fwp.fw_prune(grad_fn, lambda M, level: None, n, [1 - k / n], iterations=5, momentum=0.5,
                           init="magnitude", weights_fn=lambda: W, alpha=alpha, sizes=sizes)


def test_warm_fw_alpha_one_returns_the_magnitude_mask_exactly():
    W, res = _fw_with(1.0, [10, 25, 5])
    mag = fwp.round_relaxed(W.abs(), 12, W.abs())
    assert torch.equal(res.mask, mag)


def test_warm_fw_keeps_per_layer_counts_and_the_fixed_weights():
    sizes = [10, 25, 5]
    W, res = _fw_with(0.5, sizes, seed=3)
    mag = fwp.round_relaxed(W.abs(), 12, W.abs())
    b = fwp.WarmBudget(W, 12, sizes, 0.5)
    pos = 0
    for i, n in enumerate(sizes):
        assert int(res.mask[0, pos:pos + n].sum()) == int(mag[0, pos:pos + n].sum()) == int(b.kept[i])
        pos += n
    fixed = torch.cat([b.fixed[i, :n] for i, n in enumerate(sizes)]).unsqueeze(0)   # layer l = row l of b.fixed
    assert int(fixed.sum()) == int(torch.round(0.5 * b.kept.double()).sum())
    assert bool((res.mask | ~fixed).all())              # fixed weights stay kept
    assert bool((fixed <= mag).all())                   # and are the magnitude mask's largest
    assert not torch.equal(res.mask, mag)               # FW did re-choose some (random gradients)
    with pytest.raises(SparseFWError, match="init='magnitude'"):
        fwp.fw_prune(lambda m: (W, W), lambda M, l: None, 40, [0.7], 2, alpha=0.5)
