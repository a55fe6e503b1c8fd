"""prune --resume (sparsefw.resume): a run interrupted after a block restarts from what it wrote
and ends with the tensors of an uninterrupted run; without --resume the leftover progress is an
error, never a result."""
import json

import pytest
import torch

from sparsefw.cli import main as cli_main
from sparsefw.resume import RunState, partial_dir


class Crash(Exception):
    """The injected fault (a power loss after a block was recorded)."""


def _tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("arch,stream,extra", [("llama", False, []), ("llama", True, []),
                                               # MoE with REAP: resumed blocks are shrunk before loading
                                               ("qwen3_moe", True, ["--drop-experts", "1", "--min-expert-tokens", "1"])])
def test_resume_after_block_2_equals_an_uninterrupted_run(tmp_path, save_tiny, monkeypatch, capsys, arch, stream,
                                                          extra):
    import sparsefw.pipeline as pipeline

    src, _ = save_tiny(arch, layers=5)
    opts = ["--model", str(src), "--method", "sparsefw", "--iterations", "5", "--sparsity", "0.6",
            "--nsamples", "4", "--seqlen", "16"] + (["--stream"] if stream else []) + extra
    ref = tmp_path / "ref"
    assert cli_main(["prune", *opts, "--output", str(ref)]) == 0
    out = tmp_path / "out"
    save = RunState.save

    def crash_after_block_2(self, index, block, reports):
        save(self, index, block, reports)
        if index == 2:
            raise Crash
    monkeypatch.setattr(RunState, "save", crash_after_block_2)
    with pytest.raises(Crash):
        cli_main(["prune", *opts, "--output", str(out)])
    monkeypatch.setattr(RunState, "save", save)
    assert not out.exists()                                   # no half-written checkpoint
    state = json.loads((partial_dir(out) / "state.json").read_text())
    assert sorted(state["blocks"]) == ["0", "1", "2"]
    capsys.readouterr()
    # without --resume the leftover is refused with one line, and nothing is pruned
    assert cli_main(["prune", *opts, "--output", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    # other settings cannot resume it
    assert cli_main(["prune", *opts, "--seed", "1", "--output", str(out), "--resume"]) == 2
    assert "other settings (seed)" in capsys.readouterr().err
    # --resume prunes only blocks 3 and 4, and ends with the uninterrupted run's tensors
    solved = []
    solve = pipeline.solve_layer
    monkeypatch.setattr(pipeline, "solve_layer", lambda *a, **k: solved.append(1) or solve(*a, **k))
    assert cli_main(["prune", *opts, "--output", str(out), "--resume"]) == 0
    rep_a, rep_b = (json.loads((d / "report.json").read_text()) for d in (ref, out))
    assert len(solved) == 2 * len(rep_a["layers"]) // 5       # blocks 3 and 4 (Llama: 7 Linears each)
    a, b = _tensors(ref), _tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert rep_b["resumed_blocks"] == 3 and rep_a["resumed_blocks"] == 0
    assert [L["error_final"] for L in rep_a["layers"]] == [L["error_final"] for L in rep_b["layers"]]
    assert not partial_dir(out).exists()                      # finished: the progress folder is gone


def test_resume_needs_an_output(save_tiny, capsys):
    src, _ = save_tiny("llama")
    assert cli_main(["prune", "--model", str(src), "--method", "wanda", "--resume"]) == 2
    assert "--resume continues a run that writes --output" in capsys.readouterr().err
