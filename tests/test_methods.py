"""The method registry (sparsefw.methods): a method added by one function and one registration
goes end to end (CLI flag, report.json, model card) without touching any other file; options are
checked; the built-in methods' masks on hand-computable layers."""
import json

import pytest
import torch

from sparsefw.cli import main as cli_main
from sparsefw.config import PruneConfig
from sparsefw.errors import SparseFWError
from sparsefw.masks import parse_pattern, select
from sparsefw.methods import METHODS, LayerResult, Option, get_method, register, solve_layer
from sparsefw.models import decoder_blocks, get_weight, prunable_layers


@pytest.fixture
def toy_method():
    """A toy method registered for one test: keep the largest signed weights (or, with
    ``--toy-negative``, the most negative ones) per row / group."""
    @register("toy", "toy: keep the largest signed weights",
              options=[Option("toy_negative", False, "keep the most negative weights instead")])
    def toy(W, stats, pattern, toy_negative=False):
        return LayerResult(mask=select(-W if toy_negative else W, pattern), info={"toy_rows": W.shape[0]})

    yield "toy"
    METHODS.pop("toy")


def test_toy_method_end_to_end_cli_report_card(toy_method, tmp_path, tokenizer, make_tiny, capsys):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "base"
    base = make_tiny("llama", len(tokenizer))
    base.save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "pruned"
    rc = cli_main(["prune", "--model", str(src), "--method", "toy", "--toy-negative", "--sparsity", "0.5",
                   "--nsamples", "2", "--seqlen", "16", "--output", str(out)])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "toy" and rep["toy_negative"] is True
    assert rep["achieved_sparsity"] == pytest.approx(0.5)
    assert all(L["extra"] == {"toy_rows": L["shape"][0]} for L in rep["layers"])
    # the saved masks are exactly the bottom half of every row of the dense weights
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for b0, b1 in zip(decoder_blocks(base), decoder_blocks(pruned)):
        for (n, l0), l1 in zip(prunable_layers(b0).items(), prunable_layers(b1).values()):
            W0, W1 = get_weight(l0), get_weight(l1)
            expect = select(-W0, parse_pattern("unstructured", 0.5))
            assert torch.equal(W1 != 0, expect), n
            assert torch.equal(W1, W0 * expect), n
    card = (out / "README.md").read_text()
    assert "toy: keep the largest signed weights" in card and "toy_negative True" in card
    assert "--method toy" in card and "--toy-negative" in card
    # the flag is listed by --help, with the method it applies to
    with pytest.raises(SystemExit):
        cli_main(["prune", "--help"])
    assert "--toy-negative" in capsys.readouterr().out


def test_option_of_another_method_is_an_error(toy_method, capsys):
    with pytest.raises(SparseFWError, match="--alpha does not apply to --method wanda"):
        PruneConfig(method="wanda", alpha=0.5).validate()
    with pytest.raises(SparseFWError, match="unknown option"):
        PruneConfig(method="wanda", alfa=0.5)
    assert cli_main(["prune", "--model", "x", "--method", "toy", "--iterations", "3"]) == 2
    assert "--iterations does not apply to --method toy (only to sparsefw)" in capsys.readouterr().err


@pytest.mark.parametrize("name,value,match", [("alpha", 1.5, "--alpha must be in"), ("iterations", -1, ">= 0"),
                                              ("step", "newton", "unknown --step"), ("iterations", 2.5, "int"),
                                              ("tol", float("nan"), "--tol must be a number")])
def test_option_values_are_checked(name, value, match):
    with pytest.raises(SparseFWError, match=match):
        PruneConfig(method="sparsefw", **{name: value}).validate()


def test_registering_a_different_option_under_a_taken_name_fails():
    with pytest.raises(SparseFWError, match="reuse that Option"):
        register("clash", "x", options=[Option("alpha", 0.1, "another alpha")])(lambda W, s, p, alpha=0.1: None)
    assert "clash" not in METHODS


def test_score_methods_on_a_hand_computed_layer():
    # W (1 x 4), inputs with ||X_j|| = (1, 1, 10, 1): magnitude keeps |-5|, |3|; Wanda keeps 1*10, -5
    W = torch.tensor([[3.0, -5.0, 1.0, -2.0]])
    G = torch.diag(torch.tensor([1.0, 1.0, 100.0, 1.0], dtype=torch.float64))
    pat = parse_pattern("unstructured", 0.5)
    _, mask, info = solve_layer(W, G, pat, "magnitude")
    assert mask.tolist() == [[True, True, False, False]]
    assert info["error_final"] == pytest.approx((1 * 100 + 4) / (9 + 25 + 100 + 4))
    W_new, mask, info = solve_layer(W, G, pat, "wanda")
    assert mask.tolist() == [[False, True, True, False]]
    assert W_new.tolist() == [[0.0, -5.0, 1.0, 0.0]]
    assert info["error_final"] == info["error_wanda"] == pytest.approx((9 + 4) / 138)
    # swaps and sparsefw start from Wanda's mask; with a diagonal G it is already optimal
    for name in ("swaps", "sparsefw"):
        assert torch.equal(solve_layer(W, G, pat, name)[1], mask)


def test_sparsefw_with_swaps_0_runs_fw_only_and_the_default_runs_fw():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 32, generator=g)
    X = torch.randn(32, 200, generator=g, dtype=torch.float64)
    G = X @ X.T
    pat = parse_pattern("unstructured", 0.6)
    _, _, fw_only = solve_layer(W, G, pat, "sparsefw", {"swaps": 0})
    _, _, default = solve_layer(W, G, pat, "sparsefw")
    assert fw_only["swaps"] == 0 and fw_only["iterations"] > 0
    assert default["iterations"] > 0                           # FW iterations run by default
    assert default["error_final"] <= fw_only["error_final"] * (1 + 1e-9)   # swaps never hurt
    assert get_method("sparsefw").resolve({})["iterations"] > 0
