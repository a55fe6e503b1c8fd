"""The LLM engine on the CNN, layer by layer (cnn/layerwise.py): im2col Gram matrices of conv
layers, layerwise SparseFW / SparseGPT of one layer and of PaperCNN."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnn import fw_pruning as fwp
from cnn.layerwise import layer_gram, layer_inputs, prune_layer, prune_layerwise
from cnn.models import PaperCNN, prunable_parameters
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
