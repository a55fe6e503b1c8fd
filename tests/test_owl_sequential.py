"""OWL per-block sparsity (sparsefw/owl.py and the pre-pass in the pipeline) and true-sequential
pruning within a block (issue 16, parts 1 and 2)."""
import copy

import pytest
import torch

from conftest import tiny_model
from sparsefw.errors import SparseFWError
from sparsefw.masks import wanda_scores
from sparsefw.models import decoder_blocks, get_weight, prunable_layers
from sparsefw.owl import outlier_ratio, owl_sparsities
from sparsefw.pipeline import PruneConfig, _block_forward, prune_model


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


def test_owl_pipeline_block_sparsities_follow_the_outlier_ratios(tokenizer):
    m = tiny_model("llama", len(tokenizer), hidden=64, layers=4)
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
    from sparsefw.onload import capture_block_inputs

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
            inps = [_block_forward(block, h, extra[bi]) for h in inps]
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


@pytest.mark.parametrize("method", ["sparsefw", "sparsegpt"])
def test_true_sequential_grams_come_from_the_partially_pruned_block(tokenizer, monkeypatch, method):
    """Every layer's Gram equals X^T X of its inputs in the block whose earlier groups (in the
    order the block runs them) are pruned and whose later ones are dense; without the option all
    come from the dense block."""
    import sparsefw.pipeline as pl
    from sparsefw.calibration import calibration_windows
    from sparsefw.onload import capture_block_inputs

    seen = {}
    orig = pl.solve_layer

    def spy(W, G, pattern, cfg):
        seen[len(seen)] = G.clone()
        return orig(W, G, pattern, cfg)

    monkeypatch.setattr(pl, "solve_layer", spy)
    down = {}
    for seq in (True, False):
        seen.clear()
        dense = tiny_model("llama", len(tokenizer), hidden=32, layers=1)
        m = copy.deepcopy(dense)
        rep = prune_model(m, tokenizer, PruneConfig(method=method, sparsity=0.5, nsamples=3, seqlen=24,
                                                    true_sequential=seq), progress=False)
        names = [L["name"].split("layers.0.")[1] for L in rep["layers"]]
        if seq:
            assert names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                  ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
        windows = calibration_windows(tokenizer, "wiki", 3, 24, 0)
        blk_d, blk_p = decoder_blocks(dense)[0], dict(prunable_layers(decoder_blocks(m)[0]))
        inps, extra = capture_block_inputs(dense, decoder_blocks(dense), windows)
        probe = copy.deepcopy(blk_d)
        pl_probe = prunable_layers(probe)
        for g in groups:
            ref = {}

            def make_hook(n):
                def hook(mod, inp, out):
                    x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                    ref[n] = ref.get(n, 0) + x.t() @ x
                return hook

            hs = [pl_probe[n].register_forward_hook(make_hook(n)) for n in g]
            with torch.no_grad():
                for h in inps:
                    _block_forward(probe, h, extra[0])
            for h in hs:
                h.remove()
            for n in g:
                G = seen[names.index(n)]
                assert float((G - ref[n]).norm() / ref[n].norm()) < 1e-6, (seq, n)
            if seq:      # the next groups see this group pruned
                with torch.no_grad():
                    for n in g:
                        get_weight(pl_probe[n]).copy_(get_weight(blk_p[n]))
        down[seq] = seen[names.index("mlp.down_proj")]
    # the option is not a no-op: down_proj's inputs with the pruned q..up differ from the dense ones
    assert float((down[True] - down[False]).norm() / down[False].norm()) > 1e-3
