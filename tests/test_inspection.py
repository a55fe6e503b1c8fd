"""Inspecting a checkpoint from its safetensors alone (sparsefw/inspection.py): a real 2:4 prune and
a tampered tensor, N:M violations by hand, bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsefw.cli import main as cli_main
from sparsefw.errors import SparseFWError
from sparsefw.inspection import format_inspection, inspect_checkpoint, nm_violations


def test_inspect_real_24_prune_and_a_tampered_tensor(pruned_24, tmp_path, capsys):
    out, rep = pruned_24.folder, pruned_24.report
    info = inspect_checkpoint(out, pattern="2:4")
    # the dequantized 4-bit weights hold a few exact zeros of their own, so 2:4 gives >= 50%
    assert info["pruned_layers"] == 210 and 0.5 <= info["sparsity"] < 0.50001 and info["pattern_holds"] is True
    assert set(info["dtypes"]) == {"float32"} and info["zeros"] == rep["zeros"]
    text = format_inspection(info, per_layer=False)
    assert "sparsity 0.5000" in text and "2:4 holds in all 210 layers" in text
    # one group of 4 with three nonzeros
    bad = tmp_path / "tampered"
    bad.mkdir()
    for f in out.iterdir():
        if f.suffix != ".safetensors":
            (bad / f.name).symlink_to(f)
    sd = load_file(str(out / "model.safetensors"))
    name = "model.layers.5.mlp.down_proj.weight"
    W = sd[name]
    row, g = 3, 2
    zero = int((W[row, 4 * g:4 * g + 4] == 0).nonzero()[0])
    W[row, 4 * g + zero] = 0.125
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    info = inspect_checkpoint(bad, pattern="2:4")
    assert info["pattern_holds"] is False and info["pattern_failing_layers"] == [name]
    row_info = next(r for r in info["layers"] if r["name"] == name)
    assert row_info["nm_violations"] == 1 and row_info["nm_first"] == (3, 8)
    assert cli_main(["inspect", str(bad), "--pattern", "2:4"]) == 1        # a failed check exits 1
    assert f"2:4 FAILS in 1 of 210 layers: {name} (1 groups, first at row 3, column 8)" in capsys.readouterr().out
    assert cli_main(["inspect", str(out), "--pattern", "2:4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pattern_holds"] is True


def test_nm_violations_hand_computed():
    W = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0],
                      [0.0, 0.0, 0.0, 3.0, 1.0, 0.0, 0.0, 1.0]])
    assert nm_violations(W, 2, 4) == (1, (0, 4))
    assert nm_violations(W, 3, 4) == (0, None)
    with pytest.raises(SparseFWError, match="multiple of 3"):
        nm_violations(W, 1, 3)


def test_inspect_bad_inputs(tmp_path, capsys):
    with pytest.raises(SparseFWError, match="no .safetensors"):
        inspect_checkpoint(tmp_path)
    assert cli_main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
