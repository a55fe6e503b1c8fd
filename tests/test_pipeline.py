"""End-to-end pipeline on tiny random models of every supported architecture: exact sparsity,
reload-and-compare of the saved checkpoint, report contents, and every bad input (CLI exit 2,
nothing written)."""
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ARCHS, tiny_model
from sparsefw import api
from sparsefw.cli import main as cli_main
from sparsefw.errors import SparseFWError
from sparsefw.models import decoder_blocks, get_weight, prunable_layers
from sparsefw.pipeline import PruneConfig, prune_model


def save_tiny(tmp_path, tokenizer, arch, name="base", **kw):
    m = tiny_model(arch, len(tokenizer), **kw)
    d = tmp_path / name
    m.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d, m


def small(**kw):
    base = dict(nsamples=4, seqlen=32, iterations=30)
    base.update(kw)
    return base


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_exact_sparsity_and_reload(tmp_path, tokenizer, arch):
    from transformers import AutoModelForCausalLM

    src, _ = save_tiny(tmp_path, tokenizer, arch)
    out = tmp_path / "pruned"
    res = api.prune(str(src), output=str(out), method="sparsefw", sparsity=0.5, progress=False, **small())
    rep = json.loads((out / "report.json").read_text())
    # exact sparsity: k = round(0.5 d_in) kept in every row of every Linear, counted on saved tensors
    assert rep["achieved_sparsity"] == pytest.approx(0.5)
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
    layer0 = rep["layers"][0]
    for key in ("name", "shape", "error_warmstart", "error_final", "iterations", "fw_gap", "seconds"):
        assert key in layer0
    assert all(L["error_final"] <= L["error_warmstart"] * (1 + 1e-6) for L in rep["layers"])
    assert (out / "README.md").read_text().startswith("---")


@pytest.mark.parametrize("method,pattern", [("magnitude", "2:4"), ("wanda", "4:8"), ("ria", "unstructured"),
                                            ("sparsefw", "2:4"), ("sparsefw", "per-matrix")])
def test_methods_and_patterns(tokenizer, method, pattern):
    m = tiny_model("llama", len(tokenizer))
    rep = prune_model(m, tokenizer, PruneConfig(method=method, pattern=pattern, sparsity=None if ":" in pattern else 0.6,
                                                **small(warmstart="ria")), progress=False)
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


def test_sparsefw_beats_wanda_on_tiny_llama(tokenizer):
    base = tiny_model("llama", len(tokenizer), hidden=64)
    sd = base.state_dict()
    errs = {}
    for method in ("wanda", "sparsefw"):
        m = tiny_model("llama", len(tokenizer), hidden=64)
        m.load_state_dict(sd)
        rep = prune_model(m, tokenizer, PruneConfig(method=method, sparsity=0.6, alpha=0.5, **small(iterations=100)),
                          progress=False)
        errs[method] = rep
    # per layer, on the same inputs, SparseFW's mask is never worse than the Wanda mask
    assert all(L["error_final"] <= L["error_wanda"] * (1 + 1e-6) for L in errs["sparsefw"]["layers"])
    assert errs["sparsefw"]["mean_error_final"] < errs["sparsefw"]["mean_error_wanda"]


def run_cli(*args):
    return cli_main(list(args))


def test_cli_prune_eval_and_config(tmp_path, tokenizer, capsys):
    src, _ = save_tiny(tmp_path, tokenizer, "qwen2")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: wanda\nsparsity: 0.6\nnsamples: 3\nseqlen: 16\n")
    out = tmp_path / "o"
    assert run_cli("prune", "--config", str(cfg), "--model", str(src), "--sparsity", "0.5", "--output", str(out)) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "wanda" and rep["sparsity"] == 0.5 and rep["nsamples"] == 3   # flag overrides config
    capsys.readouterr()
    assert run_cli("eval-ppl", "--model", str(out), "--seqlen", "32", "--chunks", "2") == 0
    text = capsys.readouterr().out
    res = json.loads(text[text.index("{"):])
    assert res["chunks"] == 2 and res["seqlen"] == 32 and 1.0 < res["ppl"] < 2 * len(tokenizer)


BAD = [
    (["--model", "no/such-model-xyz"], "could not load model"),
    (["--model", "./missing_folder"], "does not exist"),
    (["--sparsity", "1.0"], "sparsity"),
    (["--sparsity", "-0.1"], "sparsity"),
    (["--pattern", "3:2"], "N:M"),
    (["--pattern", "blocky"], "unknown sparsity pattern"),
    (["--pattern", "8:16"], "multiple of 16"),
    (["--alpha", "1.5"], "alpha"),
    (["--method", "obs"], "unknown method"),
    (["--step", "fixed"], "step rule"),
    (["--nsamples", "2000", "--seqlen", "512"], "fewer than nsamples"),
    (["--calib", "short.txt"], "fewer than nsamples"),
    (["--calib", "empty.txt"], "empty"),
    (["--calib", "nowhere.txt"], "unknown text source"),
    (["--tol", "-1"], "tol must be"),
    (["--swaps", "-1"], "swaps must be"),
    (["--pattern", "2:4", "--sparsity", "0.9"], "fixes the sparsity at 50%"),
    (["--owl", "--pattern", "2:4"], "unstructured"),
    (["--owl", "--sparsity", "0.9"], "owl-lambda"),
    (["--owl", "--owl-m", "-1"], "owl-m"),
]


@pytest.mark.parametrize("args,msg", BAD)
def test_bad_input_exit_2_nothing_written(tmp_path, tokenizer, capsys, args, msg, monkeypatch):
    src, _ = save_tiny(tmp_path, tokenizer, "llama", hidden=40)   # d_in 40: 8:16 does not divide it
    (tmp_path / "short.txt").write_text("Too short to calibrate anything.")
    (tmp_path / "empty.txt").write_text("   \n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    full = ["prune", "--model", str(src), "--nsamples", "2", "--seqlen", "16", "--output", str(out)]
    full += args
    capsys.readouterr()
    code = run_cli(*full)
    err = capsys.readouterr().err.strip().splitlines()[-1]   # earlier lines: progress bars
    assert code == 2
    assert err.startswith("error:") and msg.lower() in err.lower(), err
    assert not out.exists()


def test_no_sparsity_with_alpha_one_is_honoured(tmp_path, tokenizer, capsys):
    # issue 14: --sparsity 0 --alpha 1 used to die inside the rounding (no free entries)
    src, _ = save_tiny(tmp_path, tokenizer, "llama")
    out = tmp_path / "o"
    assert run_cli("prune", "--model", str(src), "--sparsity", "0", "--alpha", "1", "--iterations", "5",
                   "--nsamples", "2", "--seqlen", "16", "--output", str(out), "--no-eval-ppl") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["achieved_sparsity"] == 0.0 and rep["mean_error_final"] == 0.0


def test_non_empty_output_and_file_output(tmp_path, tokenizer, capsys):
    src, _ = save_tiny(tmp_path, tokenizer, "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert run_cli("prune", "--model", str(src), "--nsamples", "2", "--seqlen", "16", "--output", str(out)) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    f = tmp_path / "file"
    f.write_text("x")
    assert run_cli("prune", "--model", str(src), "--nsamples", "2", "--seqlen", "16", "--output", str(f)) == 2
    # --overwrite replaces the folder atomically
    assert run_cli("prune", "--model", str(src), "--method", "magnitude", "--nsamples", "2", "--seqlen", "16",
                   "--output", str(out), "--overwrite") == 0
    assert (out / "report.json").exists() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]   # no temp folders left


def test_nan_activations_are_reported(tmp_path, tokenizer, capsys):
    src, m = save_tiny(tmp_path, tokenizer, "llama")
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    bad = tmp_path / "nan_model"
    m.save_pretrained(bad)
    tokenizer.save_pretrained(bad)
    out = tmp_path / "out"
    assert run_cli("prune", "--model", str(bad), "--nsamples", "2", "--seqlen", "16", "--output", str(out)) == 2
    assert "NaN/Inf" in capsys.readouterr().err
    assert not out.exists()


def test_crash_leaves_no_partial_checkpoint(tmp_path, tokenizer, monkeypatch):
    src, _ = save_tiny(tmp_path, tokenizer, "llama")
    out = tmp_path / "out"
    import sparsefw.saving as saving

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(saving, "model_card", boom)
    with pytest.raises(RuntimeError):
        api.prune(str(src), output=str(out), method="magnitude", progress=False, nsamples=2, seqlen=16)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize("arch", ARCHS)
def test_grams_equal_each_layers_own_inputs(tokenizer, arch):
    """G of every Linear equals X^T X of the inputs that layer really receives (captured
    independently). Regression: a per-sample cache keyed by data_ptr() handed gate/up the Gram of
    q/k/v when the allocator reused the freed attention input's address."""
    from sparsefw.onload import capture_block_inputs
    from sparsefw.pipeline import _block_forward, accumulate_grams

    torch.manual_seed(0)
    m = tiny_model(arch, len(tokenizer), hidden=64).eval()
    windows = torch.randint(0, len(tokenizer), (3, 24))
    blocks = decoder_blocks(m)
    inps, extra = capture_block_inputs(m, blocks, windows)
    layers = prunable_layers(blocks[0])
    for _ in range(3):  # repeat: address reuse depends on the allocator's state
        grams = accumulate_grams(blocks[0], inps, extra[0])
        seen = {n: torch.zeros_like(g) for n, g in grams.items()}

        def make_hook(n):
            def hook(mod, inp, out):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                seen[n] += x.t() @ x
            return hook

        hs = [l.register_forward_hook(make_hook(n)) for n, l in layers.items()]
        with torch.no_grad():
            for h in inps:
                _block_forward(blocks[0], h, extra[0])
        for hd in hs:
            hd.remove()
        for n in grams:
            # fp32 per-sample products vs fp64 here: ~1e-7 relative; the bug gave O(1)
            assert float((grams[n] - seen[n]).norm() / seen[n].norm()) < 1e-5, n
