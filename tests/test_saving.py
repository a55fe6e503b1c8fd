"""Saving pruned checkpoints (sparsefw/saving.py): a non-empty or file output is refused,
--overwrite replaces a folder atomically, a crash leaves no partial checkpoint, and a sharded
save keeps the dtype and reloads."""
import pytest
import torch

from sparsefw import api
from sparsefw.cli import main as cli_main
from sparsefw.inspection import inspect_checkpoint


def test_non_empty_output_and_file_output(tmp_path, save_tiny, capsys):
    src, _ = save_tiny("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert cli_main(["prune", "--model", str(src), "--nsamples", "2", "--seqlen", "16", "--output", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    f = tmp_path / "file"
    f.write_text("x")
    assert cli_main(["prune", "--model", str(src), "--nsamples", "2", "--seqlen", "16", "--output", str(f)]) == 2
    # --overwrite replaces the folder atomically
    assert cli_main(["prune", "--model", str(src), "--method", "magnitude", "--nsamples", "2", "--seqlen", "16",
                     "--output", str(out), "--overwrite"]) == 0
    assert (out / "report.json").exists() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]   # no temp folders left


def test_crash_leaves_no_partial_checkpoint(tmp_path, save_tiny, monkeypatch):
    src, _ = save_tiny("llama")
    out = tmp_path / "out"
    import sparsefw.saving as saving

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(saving, "model_card", boom)
    with pytest.raises(RuntimeError):
        api.prune(str(src), output=str(out), method="magnitude", progress=False, nsamples=2, seqlen=16)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_sharded_save_keeps_dtype_and_reloads(tmp_path, save_tiny):
    src, _ = save_tiny("llama", name="bf16", dtype=torch.bfloat16, hidden=64)
    out = tmp_path / "o"
    res = api.prune(str(src), output=str(out), method="wanda", pattern="2:4", nsamples=2, seqlen=16,
                    max_shard_size="2MB", progress=False)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    info = inspect_checkpoint(out, pattern="2:4")
    assert info["pattern_holds"] and set(info["dtypes"]) == {"bfloat16"} and len(info["files"]) == len(shards)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.dtype == torch.bfloat16
    for k, v in res.model.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
