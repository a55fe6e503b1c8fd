"""Training plumbing of the CNN experiments (cnn/train.py): the effective-weight gradient against
autograd, fine-tuning that keeps pruned weights exactly zero, the CSR linear layer and evaluation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cnn import fw_pruning as fwp
from cnn.models import prunable_parameters
from cnn.train import (SparseLinear, apply_masks, effective_weight_gradient, evaluate, nonzero_fractions, train,
                       with_sparse_linear)
from sparsefw.errors import SparseFWError


def test_effective_weight_gradient_matches_autograd(tiny_cnn, tiny_batch):
    model = tiny_cnn()
    x, y = tiny_batch()
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


def test_finetune_keeps_pruned_weights_exactly_zero(tiny_cnn, tiny_batch):
    model = tiny_cnn()
    x, y = tiny_batch(64)
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


def test_sparse_linear_and_evaluate(tiny_cnn, tiny_batch):
    model = tiny_cnn()
    x, y = tiny_batch(20)
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
