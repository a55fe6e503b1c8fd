"""Calibration and perplexity text (sparsefw/calibration.py), BOS handling: calibration windows and
perplexity chunks start with the tokenizer's BOS when it adds one (Llama, Gemma); tokenizers
without BOS (SmolLM2) get exactly the windows and chunks of earlier releases; the BOS mode in the
report, on the command line and in the dense-perplexity cache."""
import json

import pytest
import torch

from sparsefw import api
from sparsefw.calibration import bos_token_id, calibration_windows, eval_chunks, tokenize_text
from sparsefw.cli import main as cli_main
from sparsefw.errors import SparseFWError


def test_bos_modes(bos_tokenizer, tokenizer):
    assert bos_token_id(bos_tokenizer, "auto") == 2
    assert bos_token_id(bos_tokenizer, "always") == 2
    assert bos_token_id(bos_tokenizer, "never") is None
    # SmolLM2's tokenizer has a BOS token (<|im_start|>) but does not add it: auto leaves it out
    assert tokenizer.bos_token_id is not None and tokenizer("hi")["input_ids"][0] != tokenizer.bos_token_id
    assert bos_token_id(tokenizer, "auto") is None
    assert bos_token_id(tokenizer, "always") == tokenizer.bos_token_id
    with pytest.raises(SparseFWError, match="BOS mode"):
        bos_token_id(tokenizer, "sometimes")


def test_calibration_windows_start_with_bos(bos_tokenizer, bos_text_file):
    ids = tokenize_text(bos_tokenizer, open(bos_text_file).read())
    assert ids[0] != 2                                     # the text stream itself has no BOS
    w = calibration_windows(bos_tokenizer, bos_text_file, nsamples=8, seqlen=16, seed=3, bos="auto")
    assert w.shape == (8, 16) and (w[:, 0] == 2).all() and (w[:, 1:] != 2).all()
    # every window: BOS, then 15 consecutive tokens of the text, at the seed's random start
    starts = torch.randint(0, ids.numel() - 15, (8,), generator=torch.Generator().manual_seed(3))
    for row, s in zip(w, starts.tolist()):
        assert torch.equal(row[1:], ids[s:s + 15])
    never = calibration_windows(bos_tokenizer, bos_text_file, nsamples=8, seqlen=16, seed=3, bos="never")
    assert never.shape == (8, 16) and (never != 2).all()
    with pytest.raises(SparseFWError, match="seqlen"):
        calibration_windows(bos_tokenizer, bos_text_file, nsamples=2, seqlen=1, bos="auto")


def test_eval_chunks_with_bos(bos_tokenizer, bos_text_file):
    ids = tokenize_text(bos_tokenizer, open(bos_text_file).read())
    c = eval_chunks(bos_tokenizer, bos_text_file, seqlen=10, max_chunks=5, bos="auto")
    assert c.shape == (5, 10) and (c[:, 0] == 2).all()
    assert torch.equal(c[:, 1:].reshape(-1), ids[:45])    # consecutive, non-overlapping, no token lost
    n = eval_chunks(bos_tokenizer, bos_text_file, seqlen=10, max_chunks=5, bos="never")
    assert torch.equal(n.reshape(-1), ids[:50])


def test_smollm2_windows_and_chunks_unchanged(tokenizer, tmp_path):
    """No BOS for SmolLM2 under auto: windows and chunks equal the pre-issue formula (so every
    SmolLM2 number in the README stands)."""
    f = tmp_path / "text.txt"
    f.write_text("\n".join([open(__file__).read()] * 3))
    ids = tokenize_text(tokenizer, f.read_text())
    auto = calibration_windows(tokenizer, str(f), nsamples=6, seqlen=32, seed=0, bos="auto")
    starts = torch.randint(0, ids.numel() - 32, (6,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(auto, torch.stack([ids[s:s + 32] for s in starts.tolist()]))
    assert torch.equal(auto, calibration_windows(tokenizer, str(f), 6, 32, 0, bos="never"))
    assert torch.equal(eval_chunks(tokenizer, str(f), 32, 4, bos="auto"), ids[:128].view(4, 32))


def test_bos_in_report_and_cli(tmp_path, bos_tokenizer, bos_text_file, make_tiny, capsys):
    m = make_tiny("llama", len(bos_tokenizer))
    src = tmp_path / "src"
    m.save_pretrained(src)
    bos_tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    assert cli_main(["prune", "--model", str(src), "--method", "wanda", "--calib", bos_text_file,
                     "--nsamples", "3", "--seqlen", "16", "--output", str(out), "--eval-ppl",
                     "--ppl-source", bos_text_file, "--ppl-chunks", "2"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["bos"] == "auto" and rep["bos_token"] == "<bos>" and rep["ppl"]["bos"] == "auto"
    assert rep["ppl"]["targets"] == 2 * 15 and rep["calibration_tokens"] == 3 * 16
    # auto and never are different dense perplexities: the dense-ppl cache keeps them apart
    dense_auto = rep["ppl"]["dense"]
    out2 = tmp_path / "out2"
    assert cli_main(["prune", "--model", str(src), "--method", "wanda", "--calib", bos_text_file, "--bos", "never",
                     "--nsamples", "3", "--seqlen", "16", "--output", str(out2), "--eval-ppl",
                     "--ppl-source", bos_text_file, "--ppl-chunks", "2"]) == 0
    rep2 = json.loads((out2 / "report.json").read_text())
    assert rep2["bos"] == "never" and rep2["bos_token"] is None and rep2["ppl"]["dense"] != dense_auto
    capsys.readouterr()
    assert cli_main(["prune", "--model", str(src), "--bos", "maybe", "--output", str(tmp_path / "x")]) == 2
    assert "BOS mode" in capsys.readouterr().err and not (tmp_path / "x").exists()
    res = api.eval_ppl(str(src), source=bos_text_file, seqlen=16, chunks=2, bos="auto", progress=False)
    assert res["ppl"] == pytest.approx(dense_auto) and res["bos_token_id"] == 2
