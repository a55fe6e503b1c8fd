"""OWL per-block sparsity (sparsefw/owl.py): the outlier ratio and the block sparsities by hand, the
pipeline's dense pre-pass giving each block the sparsity of its outlier ratio, and bad input."""
import copy

import pytest
import torch

from sparsefw.capture import block_forward
from sparsefw.config import PruneConfig
from sparsefw.errors import SparseFWError
from sparsefw.masks import wanda_scores
from sparsefw.models import decoder_blocks, get_weight, prunable_layers
from sparsefw.owl import outlier_ratio, owl_sparsities
from sparsefw.pipeline import prune_model


def test_outlier_ratio_by_hand():
    # scores 1, 1, 1, 1, 1, 1, 1, 1, 1, 11 (two layers): mean 2; M = 5 -> outliers > 10: one of ten
    a = torch.ones(2, 4)
    b = torch.tensor([[1.0, 11.0]])
    assert outlier_ratio([a, b], 5.0) == pytest.approx(0.1)
    assert outlier_ratio([a, b], 6.0) == 0.0          # 11 < 12
    with pytest.raises(SparseFWError):
        outlier_ratio([a], 0.0)


def test_owl_sparsities_by_hand():
    # D = (0, 0.5, 1), lambda 0.1: keep offsets 0, 0.1, 0.2 (mean 0.1) -> sparsities S + 0.1, S, S - 0.1
    sp = owl_sparsities([0.0, 0.05, 0.1], 0.6, 0.1)
    assert sp == pytest.approx([0.7, 0.6, 0.5])
    # skewed ratios: mean still S, span 2 lambda, more outliers -> lower sparsity
    sp = owl_sparsities([0.01, 0.01, 0.01, 0.05], 0.7, 0.08)
    assert sum(sp) / 4 == pytest.approx(0.7)
    assert max(sp) - min(sp) == pytest.approx(0.16)
    assert sp[3] == pytest.approx(0.7 - 0.12) and sp[0] == pytest.approx(0.7 + 0.04)
    assert owl_sparsities([0.02, 0.02], 0.5, 0.08) == [0.5, 0.5]
    with pytest.raises(SparseFWError, match="owl-lambda"):
        owl_sparsities([0.0, 1.0], 0.9, 0.08)             # 0.9 + 0.16 >= 1


def test_owl_pipeline_block_sparsities_follow_the_outlier_ratios(tokenizer, make_tiny):
    m = make_tiny("llama", len(tokenizer), hidden=64, layers=4)
    ref = copy.deepcopy(m)
    rep = prune_model(m, tokenizer, PruneConfig(method="wanda", sparsity=0.6, owl=True, owl_lambda=0.1,
                                                nsamples=4, seqlen=32), progress=False)
    owl = rep["owl"]
    sps, ratios = owl["block_sparsities"], owl["outlier_ratios"]
    assert len(sps) == 4 and sum(sps) / 4 == pytest.approx(0.6)
    assert max(sps) - min(sps) == pytest.approx(0.2)
    assert len(set(ratios)) == 4
    order = sorted(range(4), key=lambda i: ratios[i])
    assert [sps[i] for i in order] == sorted(sps, reverse=True)   # more outliers, lower sparsity
    # the pruned blocks have the assigned sparsity (k = round((1 - s) d_in) kept per row)
    for bi, block in enumerate(decoder_blocks(m)):
        for layer in prunable_layers(block).values():
            W = get_weight(layer)
            assert ((W != 0).sum(1) == round((1 - sps[bi]) * W.shape[1])).all()
    # the ratios are those of the dense model's Wanda scores on the dense activations
    from sparsefw.calibration import calibration_windows
    from sparsefw.capture import capture_block_inputs

    windows = calibration_windows(tokenizer, "wiki", 4, 32, 0)
    blocks = decoder_blocks(ref)
    inps, extra = capture_block_inputs(ref, blocks, windows)
    for bi, block in enumerate(blocks):
        norms = {}

        def make_hook(n):
            def hook(mod, inp, out):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                norms[n] = norms.get(n, 0) + (x * x).sum(0)
            return hook

        layers = prunable_layers(block)
        hs = [l.register_forward_hook(make_hook(n)) for n, l in layers.items()]
        with torch.no_grad():
            inps = [block_forward(block, h, extra[bi]) for h in inps]
        for h in hs:
            h.remove()
        scores = [wanda_scores(get_weight(l), norms[n].sqrt().float()) for n, l in layers.items()]
        assert outlier_ratio(scores, 5.0) == pytest.approx(ratios[bi], abs=2e-3)


@pytest.mark.parametrize("kw,msg", [(dict(pattern="2:4", sparsity=None), "unstructured"),
                                    (dict(sparsity=0.9), "owl-lambda"),
                                    (dict(owl_m=0), "owl-m")])
def test_owl_bad_input(kw, msg):
    with pytest.raises(SparseFWError, match=msg):
        PruneConfig(method="wanda", owl=True, **kw).validate()
