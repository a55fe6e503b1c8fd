"""The block driver (sparsefw/pipeline.py) end to end on tiny random models of every supported
architecture: exact sparsity, reload-and-compare of the saved checkpoint, report contents, every
method and pattern, SparseFW below Wanda, and true-sequential pruning within a block (each layer
group fitted to the block with the earlier groups pruned)."""
import copy
import json
import math

import pytest
import torch

from sparsefw import api
from sparsefw.capture import block_forward
from sparsefw.config import PruneConfig
from sparsefw.models import decoder_blocks, get_weight, prunable_layers
from sparsefw.pipeline import prune_model


def small(**kw):
    """Run settings of a quick calibration (4 x 32 tokens), updated by ``kw``."""
    base = dict(nsamples=4, seqlen=32)
    base.update(kw)
    return base


def test_every_architecture_exact_sparsity_and_reload(tmp_path, tokenizer, arch, save_tiny):
    from transformers import AutoModelForCausalLM

    src, _ = save_tiny(arch)
    out = tmp_path / "pruned"
    res = api.prune(str(src), output=str(out), method="sparsefw", sparsity=0.5, iterations=30, progress=False,
                    **small())
    rep = json.loads((out / "report.json").read_text())
    # exact sparsity: k = round(0.5 d_in) kept in every row of every Linear, counted on saved tensors
    assert rep["achieved_sparsity"] == pytest.approx(0.5)
    from sparsefw.report import code_version
    assert rep["code"] == code_version() and rep["code"] != "unknown"     # the code that made it (git checkout)
    for block in decoder_blocks(res.model):
        for _, layer in prunable_layers(block).items():
            W = get_weight(layer)
            assert ((W != 0).sum(1) == round(0.5 * W.shape[1])).all()
    # reload identical: same tensors, same logits
    re = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    sd1, sd2 = res.model.state_dict(), re.state_dict()
    for k, v in sd1.items():
        assert torch.equal(v, sd2[k]), k
    x = torch.randint(0, len(tokenizer), (1, 16))
    with torch.no_grad():
        assert torch.equal(res.model(x).logits, re(x).logits)
    # report contents
    for key in ("model", "method", "warmstart", "alpha", "pattern", "sparsity", "nsamples", "seqlen", "seed",
                "seconds", "achieved_sparsity", "layers"):
        assert key in rep
    assert rep["iterations"] == 30 and "blocksize" not in rep     # sparsefw's options only
    layer0 = rep["layers"][0]
    for key in ("name", "shape", "error_warmstart", "error_final", "iterations", "fw_gap", "seconds"):
        assert key in layer0
    assert all(L["error_final"] <= L["error_warmstart"] * (1 + 1e-6) for L in rep["layers"])
    assert (out / "README.md").read_text().startswith("---")


@pytest.mark.parametrize("method,pattern,options", [
    ("magnitude", "2:4", {}), ("wanda", "4:8", {}), ("ria", "unstructured", {}),
    ("sparsefw", "2:4", {"warmstart": "ria", "iterations": 30}),
    ("sparsefw", "per-matrix", {"warmstart": "ria", "iterations": 30}),
    ("swaps", "unstructured", {"warmstart": "ria"}), ("sparsegpt", "4:8", {"blocksize": 16})])
def test_methods_and_patterns(tokenizer, make_tiny, method, pattern, options):
    m = make_tiny("llama", len(tokenizer))
    rep = prune_model(m, tokenizer, PruneConfig(method=method, pattern=pattern, sparsity=None if ":" in pattern else 0.6,
                                                **small(**options)), progress=False)
    for block in decoder_blocks(m):
        for _, layer in prunable_layers(block).items():
            W = get_weight(layer)
            if pattern in ("2:4", "4:8"):
                n, mm = map(int, pattern.split(":"))
                assert ((W != 0).view(W.shape[0], -1, mm).sum(-1) == n).all()
            elif pattern == "unstructured":
                assert ((W != 0).sum(1) == round(0.4 * W.shape[1])).all()
    if pattern == "per-matrix":
        tot = sum(get_weight(l).numel() for b in decoder_blocks(m) for l in prunable_layers(b).values())
        nz = sum(int((get_weight(l) != 0).sum()) for b in decoder_blocks(m) for l in prunable_layers(b).values())
        assert nz <= round(0.4 * tot) + 14
    assert math.isfinite(rep["mean_error_final"])
    assert len(rep["block_seconds"]) == len(decoder_blocks(m)) and all(t > 0 for t in rep["block_seconds"])


def test_sparsefw_beats_wanda_on_tiny_llama(tokenizer, make_tiny):
    base = make_tiny("llama", len(tokenizer), hidden=64)
    sd = base.state_dict()
    errs = {}
    for method, options in (("wanda", {}), ("sparsefw", {"alpha": 0.5, "iterations": 100})):
        m = make_tiny("llama", len(tokenizer), hidden=64)
        m.load_state_dict(sd)
        rep = prune_model(m, tokenizer, PruneConfig(method=method, sparsity=0.6, **small(**options)), progress=False)
        errs[method] = rep
    # per layer, on the same inputs, SparseFW's mask is never worse than the Wanda mask
    assert all(L["error_final"] <= L["error_wanda"] * (1 + 1e-6) for L in errs["sparsefw"]["layers"])
    assert errs["sparsefw"]["mean_error_final"] < errs["sparsefw"]["mean_error_wanda"]
    # that Wanda reference is the Wanda run's own error: block 0 sees the same dense inputs in both runs
    first = [(a, b) for a, b in zip(errs["wanda"]["layers"], errs["sparsefw"]["layers"]) if ".layers.0." in a["name"]]
    assert len(first) == 7 and all(a["name"] == b["name"] for a, b in first)
    assert all(a["error_final"] == pytest.approx(b["error_wanda"], rel=1e-6) for a, b in first)


@pytest.mark.parametrize("method", ["sparsefw", "sparsegpt"])
def test_true_sequential_grams_come_from_the_partially_pruned_block(tokenizer, make_tiny, monkeypatch, method):
    """Every layer's Gram equals X^T X of its inputs in the block whose earlier groups (in the
    order the block runs them) are pruned and whose later ones are dense; without the option all
    come from the dense block."""
    import sparsefw.pipeline as pl
    from sparsefw.calibration import calibration_windows
    from sparsefw.capture import capture_block_inputs

    seen = {}
    orig = pl.solve_layer

    def spy(W, G, pattern, *args, **kw):
        seen[len(seen)] = G.clone()
        return orig(W, G, pattern, *args, **kw)

    monkeypatch.setattr(pl, "solve_layer", spy)
    down = {}
    for seq in (True, False):
        seen.clear()
        dense = make_tiny("llama", len(tokenizer), hidden=32, layers=1)
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
                    block_forward(probe, h, extra[0])
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


def test_reconstruction_keeps_the_first_blocks_mask(tokenizer, make_tiny):
    """G is float64 with --reconstruct and float32 without; the masks are computed from the same
    float32 G either way, so block 0 (same dense inputs in both runs) gets the same mask."""
    base = make_tiny("llama", len(tokenizer), hidden=64)
    sd = base.state_dict()
    masks = {}
    for rec in (False, True):
        m = make_tiny("llama", len(tokenizer), hidden=64)
        m.load_state_dict(sd)
        prune_model(m, tokenizer, PruneConfig(method="sparsefw", sparsity=0.6, reconstruct=rec, **small()),
                    progress=False)
        masks[rec] = {n: get_weight(l) != 0 for n, l in prunable_layers(decoder_blocks(m)[0]).items()}
    assert masks[False].keys() == masks[True].keys()
    for n in masks[False]:
        assert torch.equal(masks[False][n], masks[True][n]), n


def test_phi3_fused_projections_are_one_matrix_each(tmp_path, tokenizer, save_tiny):
    """Phi-3's qkv_proj and gate_up_proj are single Linears: each is one layer with one input, and a
    2:4 mask holds in every group of 4 inputs of every row of the fused matrix."""
    src, _ = save_tiny("phi3")
    res = api.prune(str(src), output=str(tmp_path / "o"), method="wanda", pattern="2:4", progress=False, **small())
    names = {L["name"] for L in res.report["layers"]}
    assert names == {f"model.layers.{b}.{n}" for b in range(2)
                     for n in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    for block in decoder_blocks(res.model):
        for n in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
            W = block.get_submodule(n).weight
            assert W.shape[0] > W.shape[1] and ((W != 0).view(W.shape[0], -1, 4).sum(-1) == 2).all(), n
