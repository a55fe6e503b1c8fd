"""The SFW optimizer and SFW-Init (cnn/sfw.py): bad input, initial norms, parameter groups, iterates
kept in the K-sparse polytope, the step rules by hand, state save / load, the dynamic learning
rate, SFW-Init learning scales and ending feasible."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from cnn.ksparse import in_ksparse, ksparse_norms
from cnn.sfw import SFW, SFWSchedule, dynamic_lr_factor, expected_init_norms, ksparse_param_groups, sfw_init
from sparsefw.errors import SparseFWError


@pytest.mark.parametrize("call", [
    lambda: SFW([{"params": [nn.Parameter(torch.ones(3))]}]),
    lambda: SFW([{"params": [nn.Parameter(torch.ones(3))], "K": 1, "radius": 1.0}], momentum=1.0),
    lambda: SFW([{"params": [nn.Parameter(torch.ones(3))], "K": 1, "radius": 1.0}], rescale="x"),
])
def test_bad_input_raises_sparsefw_error(call):
    with pytest.raises(SparseFWError):
        call()


def test_expected_init_norms_leave_model_and_rng_alone():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(100, 50))
    before = {n: p.detach().clone() for n, p in lin.named_parameters()}
    state = torch.get_rng_state()
    norms = expected_init_norms(lin, repetitions=50)
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(before[n], p) for n, p in lin.named_parameters())
    # kaiming_uniform(a=sqrt 5): U(-b, b), b = 1/sqrt(fan_in) = 0.1 -> E||w|| ~ sqrt(5000 b^2 / 3)
    assert norms["0.weight"] == pytest.approx(math.sqrt(5000 * 0.01 / 3), rel=0.02)
    assert norms["0.bias"] == pytest.approx(math.sqrt(50 * 0.01 / 3), rel=0.1)


def test_param_groups_k_and_radius():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 3))
    groups = ksparse_param_groups(m, k_frac=0.05, tau=15, repetitions=30)
    assert [g["name"] for g in groups] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [g["K"] for g in groups] == [250, 2, 7, 1]
    r0 = 15 * math.sqrt(5000 * 0.01 / 3) / math.sqrt(250)
    assert groups[0]["radius"] == pytest.approx(r0, rel=0.03)
    # the default init is feasible
    opt = SFW(groups, lr=0.5)
    assert opt.is_feasible(rtol=0)


def _tiny_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 6, generator=gen)
    y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, X, y


def test_iterates_stay_in_the_polytope_over_100_steps_and_loss_drops():
    model, X, y = _tiny_problem()
    groups = ksparse_param_groups(model, k_frac=0.2, tau=2.0, repetitions=10)
    opt = SFW(groups, lr=2.0, momentum=0.9)  # large lr: gamma hits the clip at 1 (vertices)
    opt.make_feasible()
    loss0 = nn.functional.cross_entropy(model(X), y).item()
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        for g in groups:
            p = g["params"][0]
            linf, l1 = ksparse_norms(p)
            assert linf <= g["radius"] * (1 + 1e-5) and l1 <= g["radius"] * g["K"] * (1 + 1e-5)
    assert any(opt.state[g["params"][0]]["gamma"] == 1.0 for g in groups)
    assert nn.functional.cross_entropy(model(X), y).item() < 0.8 * loss0


def test_step_rules_hand_computed():
    theta = torch.tensor([0.2, -0.1, 0.0, 0.4])
    g1, g2 = torch.tensor([1.0, -3.0, 0.5, 0.0]), torch.tensor([0.0, 1.0, -4.0, 0.0])
    r, k, rho = 2.0, 1, 0.9
    for rescale, lr in (("none", 0.1), ("gradient", 0.05)):
        p = nn.Parameter(theta.clone())
        opt = SFW([{"params": [p], "K": k, "radius": r}], lr=lr, momentum=rho, rescale=rescale)
        exp = theta.clone()
        d = None
        for g in (g1, g2):
            d = g.clone() if d is None else rho * d + (1 - rho) * g   # first buffer = g
            v = torch.zeros(4)
            i = int(d.abs().argmax())
            v[i] = -r * math.copysign(1.0, float(d[i]))
            gamma = lr if rescale == "none" else min(lr * float(d.norm()) / float((v - exp).norm()), 1.0)
            exp = exp + gamma * (v - exp)
            p.grad = g.clone()
            opt.step()
            assert opt.state[p]["gamma"] == pytest.approx(gamma, rel=1e-6)
            assert torch.allclose(p.detach(), exp, atol=1e-6)
        assert torch.allclose(opt.state[p]["momentum_buffer"], d)


def test_state_saves_and_loads():
    model, X, y = _tiny_problem(1)
    groups = ksparse_param_groups(model, k_frac=0.2, tau=5.0, repetitions=5)
    opt = SFW(groups, lr=0.3)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)
    model2 = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model2.load_state_dict(ck["model"])
    groups2 = [{"params": [p], "K": 1, "radius": 1.0} for p in model2.parameters()]  # overwritten
    opt2 = SFW(groups2, lr=0.01)
    opt2.load_state_dict(ck["opt"])
    assert [g["K"] for g in opt2.param_groups] == [g["K"] for g in opt.param_groups]
    assert [g["radius"] for g in opt2.param_groups] == [g["radius"] for g in opt.param_groups]
    assert opt2.param_groups[0]["lr"] == 0.3
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
    for m, o in ((model, opt), (model2, opt2)):
        for _ in range(3):
            o.zero_grad()
            nn.functional.cross_entropy(m(X), y).backward()
            o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_dynamic_lr_rule_and_schedule():
    assert dynamic_lr_factor([1.0] * 9) == 1.0                      # < 10 epochs
    assert dynamic_lr_factor([2.0] * 5 + [1.0] * 5) == 1.06         # still improving
    assert dynamic_lr_factor([1.0] * 5 + [2.0] * 5) == 0.7          # got worse
    assert dynamic_lr_factor([1.0] * 10) == 0.7                     # stalled
    p = nn.Parameter(torch.zeros(2))
    opt = SFW([{"params": [p], "K": 1, "radius": 1.0}], lr=1.0)
    sch = SFWSchedule(opt, milestones=[3], gamma=0.1, dynamic=True)
    lrs = []
    for ep in range(12):
        sch.epoch_end(10.0 - ep)                                     # always improving
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:2] == [1.0, 1.0] and lrs[2] == pytest.approx(0.1)
    assert lrs[8] == pytest.approx(0.1) and lrs[9] == pytest.approx(0.106)
    assert lrs[11] == pytest.approx(0.1 * 1.06 ** 3)


def test_sfw_init_learns_scales_and_ends_feasible():
    model, X, y = _tiny_problem(2)
    groups = ksparse_param_groups(model, k_frac=0.2, tau=0.5, repetitions=5)  # small polytope
    gen = torch.Generator().manual_seed(0)

    def stream():
        while True:
            idx = torch.randint(0, len(X), (16,), generator=gen)
            yield X[idx], y[idx]

    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = sfw_init(model, groups, stream(), lr=0.5, iters=30, adam_lr=0.01)
    assert set(info["scales"]) == set(theta0)
    assert any(abs(a - 1.0) > 1e-3 for a in info["scales"].values())   # scales moved
    assert all(a >= 0.01 for n, a in info["scales"].items() if n.endswith("weight"))
    assert math.isfinite(info["loss_before"]) and math.isfinite(info["loss_after"])
    for g in groups:
        p = g["params"][0]
        assert in_ksparse(p, g["K"], g["radius"], rtol=1e-6)
        # still a positive multiple of the initial tensor
        n = [k for k, q in model.named_parameters() if q is p][0]
        c = float((p.detach() * theta0[n]).sum() / (theta0[n] ** 2).sum())
        assert c > 0 and torch.allclose(p.detach(), c * theta0[n], atol=1e-6)
