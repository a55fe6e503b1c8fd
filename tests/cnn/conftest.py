"""Fixtures of the CNN tests (tests/conftest.py's fixtures, e.g. ``mnist`` and ``sweep_config``, are
visible here too): a tiny conv net and a tiny batch of MNIST-shaped data."""
from __future__ import annotations

import pytest
import torch
from torch import nn


def _tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(2 * 13 * 13, 3))


def _tiny_batch(n: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.fixture
def tiny_cnn():
    """Factory ``tiny_cnn(seed=0)``: conv(1 -> 2, 3x3), ReLU, max-pool 2, flatten, linear(338 -> 3)."""
    return _tiny_cnn


@pytest.fixture
def tiny_batch():
    """Factory ``tiny_batch(n=32, seed=0)``: (x (n, 1, 28, 28) uniform in [0, 1), y (n,) labels 0..2)."""
    return _tiny_batch
