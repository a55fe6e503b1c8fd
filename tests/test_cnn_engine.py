"""The LLM engine on the CNN (issue 17): im2col Gram matrices of conv layers, the warmstarted
global FW with alpha-fixing and per-layer budgets, layerwise SparseFW / SparseGPT on PaperCNN."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnn import fw_pruning as fwp
from cnn.layerwise import layer_gram, layer_inputs, prune_layer, prune_layerwise
from cnn.models import PaperCNN, prunable_parameters
from conftest import have_mnist, tiny_sweep_config
from sparsefw.errors import SparseFWError


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_conv_gram_gives_the_conv_output_norm(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(4, 3, 11, 9)
    G = layer_gram(conv, x)
    W = conv.weight.detach().view(5, -1).double()
    with torch.no_grad():
        out = F.conv2d(x.double(), conv.weight.double(), None, stride, padding, dilation)   # no bias
    assert float((W @ G * W).sum()) == pytest.approx(float(out.square().sum()), rel=1e-9)
    # and the rows of X times W^T are the conv outputs themselves
    X = layer_inputs(conv, x).double()
    assert torch.allclose((X @ W.t()).view(4, -1, 5).transpose(1, 2).reshape(out.shape), out, atol=1e-9)


def test_linear_gram_and_unsupported_layers():
    lin = nn.Linear(4, 2)
    x = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.0, 1.0, 1.0, 1.0]])
    assert torch.equal(layer_gram(lin, x), (x.t() @ x).double())
    with pytest.raises(SparseFWError, match="groups=1"):
        layer_gram(nn.Conv2d(4, 4, 3, groups=2), torch.randn(1, 4, 5, 5))
    with pytest.raises(SparseFWError, match="not BatchNorm2d"):
        layer_gram(nn.BatchNorm2d(3), torch.randn(1, 3, 4, 4))


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
    fixed = fwp._as_flat(b.fixed, sizes)
    assert int(fixed.sum()) == int(torch.round(0.5 * b.kept.double()).sum())
    assert bool((res.mask | ~fixed).all())              # fixed weights stay kept
    assert bool((fixed <= mag).all())                   # and are the magnitude mask's largest
    assert not torch.equal(res.mask, mag)               # FW did re-choose some (random gradients)
    with pytest.raises(SparseFWError, match="init='magnitude'"):
        fwp.fw_prune(lambda m: (W, W), lambda M, l: None, 40, [0.7], 2, alpha=0.5)


def test_prune_layer_counts_and_errors_by_method():
    torch.manual_seed(1)
    X = torch.randn(200, 12) @ torch.randn(12, 12)       # correlated inputs
    G = (X.t() @ X).double()
    W = torch.randn(6, 12)
    errs = {}
    for method in ("sparsefw", "sparsefw+rec", "sparsegpt"):
        W_new, mask, info = prune_layer(W, G, 20, method, iterations=50)
        assert int(mask.sum()) == 20 and bool((W_new[~mask] == 0).all())
        errs[method] = info["error_final"]
        if method != "sparsegpt":       # never worse than its magnitude warmstart (SparseGPT can be)
            assert info["error_final"] < info["error_magnitude"]
    assert errs["sparsefw+rec"] <= errs["sparsefw"] * (1 + 1e-6)
    _, _, info = prune_layer(W, G, 20, "sparsefw", alpha=1.0, iterations=0, swaps=0)
    assert info["error_final"] == pytest.approx(info["error_magnitude"])   # alpha 1: the warmstart
    with pytest.raises(SparseFWError, match="unknown layerwise method"):
        prune_layer(W, G, 20, "obs")


def test_prune_layerwise_papercnn_keeps_magnitude_counts_and_fits_pruned_inputs():
    torch.manual_seed(0)
    model = PaperCNN().eval()
    x = torch.rand(64, 1, 28, 28)
    mag = fwp.global_magnitude_mask(prunable_parameters(model), 0.9)
    kept = {k: int(v.sum()) for k, v in mag.items()}
    seen = {}
    conv2 = model[3]
    hook = conv2.register_forward_pre_hook(lambda mod, inp: seen.setdefault("x", inp[0].clone()))
    masks, infos = prune_layerwise(model, x, kept, "sparsefw", iterations=30, swaps=10)
    hook.remove()
    assert [i["layer"] for i in infos] == ["0.weight", "3.weight", "8.weight"]
    for k, mk in masks.items():
        assert int(mk.sum()) == kept[k]
        assert bool((dict(model.named_parameters())[k][~mk] == 0).all())
    for i in infos:
        assert i["error_final"] <= i["error_magnitude"] * (1 + 1e-6)
    # conv2 was fitted to the output of the pruned conv1 (the sequential scheme)
    with torch.no_grad():
        h = model[2](model[1](model[0](x)))
    assert torch.allclose(seen["x"], h)


@pytest.mark.skipif(not have_mnist(), reason="MNIST not installed (bash scripts/setup.sh)")
def test_engine_quick_config_smoke(tmp_path):
    from cnn.experiments import run_sweep
    cfg = tiny_sweep_config("configs/cnn_engine_quick.yaml", tmp_path)
    cfg["prune"].update(subsample=32, fw_iterations=2, ramp_iterations=2, calib_samples=64,
                        layerwise={"iterations": 5, "swaps": 2})
    cfg["engine"]["sparsities"] = [0.9]
    s = run_sweep(cfg, tmp_path / "out", progress=False)
    runs = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert {r["method"] for r in runs} == set(cfg["engine"]["variants"])
    nz = {r["method"]: r["nonzero_prunable"] for r in runs}
    assert len(set(round(v, 9) for v in nz.values())) == 1          # same kept count for every variant
    for r in runs:
        assert 0.0 <= r["accuracy_noft"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
    assert len([r for r in runs if r.get("layers")]) == 3
    assert (tmp_path / "out" / "fig6_engine.png").exists()
    assert "engine_90pct_budget2_magnitude_ft" not in s["acceptance"]   # budget 1 only here
    assert "Engine on the CNN" in (tmp_path / "out" / "tables.md").read_text()


@pytest.mark.skipif(not have_mnist(), reason="MNIST not installed (bash scripts/setup.sh)")
def test_two_worker_processes_give_the_sequential_rows(tmp_path):
    from cnn.experiments import run_sweep
    cfg = tiny_sweep_config("configs/cnn_engine_quick.yaml", tmp_path)
    cfg["prune"].update(subsample=32, fw_iterations=2, ramp_iterations=2, calib_samples=64,
                        layerwise={"iterations": 5, "swaps": 2})
    cfg["engine"].update(sparsities=[0.9], seeds=[0, 1], variants={
        "magnitude": {}, "fw_warm": {"method": "fw", "init": "magnitude", "alpha": 0.5, "per_layer": True},
        "lw_sparsefw_rec": {"method": "layerwise", "layerwise_method": "sparsefw+rec"}})
    rows = {}
    for workers in (1, 2):   # one thread per process either way: the same arithmetic
        c = {**cfg, "threads": 1, "workers": workers, "ckpt_dir": str(tmp_path / f"ckpt{workers}")}
        run_sweep(c, tmp_path / f"out{workers}", progress=False)
        lines = (tmp_path / f"out{workers}" / "runs.jsonl").read_text().splitlines()
        rows[workers] = {r["key"]: r for r in map(json.loads, lines)}
    assert len(rows[1]) == 6 and rows[1].keys() == rows[2].keys()
    for k, r in rows[1].items():   # dense training and every run repeated exactly in the workers
        for m in ("dense_accuracy", "accuracy_noft", "accuracy", "loss", "nonzero_prunable",
                  "overlap_with_magnitude"):
            assert rows[2][k][m] == r[m], (k, m)


def test_dense_cache_is_keyed_by_the_training_thread_count(tmp_path):
    """1- and 2-thread training sum in another order (different 10-epoch models), so they must not
    share cached checkpoints; the parent of a worker pool must find the workers' checkpoints."""
    from cnn.experiments import _ckpt_dir, _process_threads

    base = {"dense": {"lr": 0.05, "momentum": 0.9, "batch_size": 128}, "ckpt_dir": str(tmp_path)}
    assert _process_threads({**base, "threads": 2}) == 2
    assert _process_threads({**base, "threads": 2, "workers": 2}) == 1
    assert _process_threads({**base, "threads": 1, "workers": 2}) == 1
    assert _process_threads({**base, "threads": 4, "workers": 2}) == 2
    d2 = _ckpt_dir("mnist", 0, {**base, "threads": 2})
    d1 = _ckpt_dir("mnist", 0, {**base, "threads": 2, "workers": 2})
    assert d1 != d2 and d1.name.endswith("_t1") and d2.name.endswith("_t2")
    assert _ckpt_dir("mnist", 0, {**base, "threads": 1}) == d1
