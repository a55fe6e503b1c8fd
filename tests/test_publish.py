"""Publishing (issue 15): the model card's hub metadata, push (Hub calls recorded, never made),
inspect on the safetensors alone, sharding, and a reload with plain transformers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model
from sparsefw import api
from sparsefw.cli import main as cli_main
from sparsefw.errors import SparseFWError
from sparsefw.inspection import format_inspection, inspect_checkpoint, nm_violations
from sparsefw.models import PACKAGED
from sparsefw.publish import build_model_card, push, source_info, upload_plan

TOKEN_IDS = [[1, 504, 3458, 282, 253, 1345, 30, 378, 2162, 314, 15, 2]]


@pytest.fixture(scope="module")
def pruned_24(tmp_path_factory):
    """A real 2:4 prune of the packaged SmolLM2-135M (Wanda, tiny calibration: ~30 s), saved."""
    out = tmp_path_factory.mktemp("pub") / "smollm2-24"
    res = api.prune("smollm2-135m", output=str(out), method="wanda", pattern="2:4", nsamples=2, seqlen=64,
                    eval_ppl=True, ppl_chunks=2, ppl_seqlen=64, progress=False)
    with torch.no_grad():
        logits = res.model(torch.tensor(TOKEN_IDS)).logits
    return out, res.report, logits


def save_tiny(tmp_path, tokenizer, name="tiny"):
    d = tmp_path / name
    tiny_model("llama", len(tokenizer), hidden=64).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))      # no login cache there
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(c, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"), raising=False)


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi with create_repo / create_branch / upload_folder / whoami recording their calls."""
    from huggingface_hub import HfApi

    calls = []

    def rec(name, ret=None):
        def f(self, *a, **k):
            calls.append((name, a, k))
            return ret
        return f

    monkeypatch.setattr(HfApi, "create_repo", rec("create_repo"))
    monkeypatch.setattr(HfApi, "create_branch", rec("create_branch"))
    monkeypatch.setattr(HfApi, "upload_folder", rec("upload_folder"))
    monkeypatch.setattr(HfApi, "whoami", rec("whoami", {"name": "me"}))
    return calls


# ---------------------------------------------------------------------------- source model
@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_packaged_source_from_gguf_header(name):
    src = source_info(name)
    assert src["hub_id"] == PACKAGED[name]["hub"]     # derived from the header, equals the registry
    if name == "smollm2-135m":
        assert src["license"] == "apache-2.0" and src["quantization"] == "Q4_1" and src["chat_template"]
    else:
        assert src["license"] == "gemma" and src["quantization"] == "Q4_K_M"


def test_source_of_folder_and_hub_id(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-3.2-1B"}))
    assert source_info(str(d))["hub_id"] == "meta-llama/Llama-3.2-1B"
    (d / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/llama"}))
    assert source_info(str(d))["hub_id"] is None
    assert source_info("Qwen/Qwen2.5-0.5B")["hub_id"] == "Qwen/Qwen2.5-0.5B"


# ---------------------------------------------------------------------------- card
def test_card_of_real_24_prune(pruned_24):
    from huggingface_hub import ModelCard

    out, rep, _ = pruned_24
    card = ModelCard.load(out / "README.md")
    d = card.data
    assert d.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and d.license == "apache-2.0"
    assert d.library_name == "transformers" and d.pipeline_tag == "text-generation"
    assert {"sparse", "pruned", "sparsefw", "wanda", "2:4"} <= set(d.tags)
    assert d.datasets == ["rajpurkar/squad"]
    ev = d.eval_results[0]
    assert ev.metric_type == "perplexity" and ev.metric_value == pytest.approx(rep["ppl"]["pruned"], abs=1e-4)
    assert ev.dataset_type == "google/boolq"
    # metadata round-trips through the text
    again = ModelCard(str(card))
    assert again.data.to_dict() == d.to_dict()
    text = card.text
    assert "dequantized from the Q4_1 GGUF `SmolLM2-135M-Instruct.Q4_1.gguf`" in text
    assert "2:4 holds in all 210 layers" in text
    assert "sparsefw prune --model smollm2-135m --method wanda --pattern 2:4" in text
    assert f"{rep['ppl']['dense']:.3f} | {rep['ppl']['pruned']:.3f}" in text


def test_card_names_the_repo_and_zero_shot(tmp_path):
    rep = {"model": "smollm2-135m", "method": "sparsefw", "pattern": "unstructured", "sparsity": 0.6,
           "warmstart": "wanda", "alpha": 0.5, "iterations": 0, "swaps": 50, "swaps_applied": 123456, "calib": "austen", "nsamples": 8, "seqlen": 128, "seed": 0,
           "source": {"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
           "zeroshot": {"tasks": {"boolq": {"acc": 0.61234}, "rte": {"acc": 0.5}}, "mean_acc": 0.55617},
           "layers": [{"error_final": 0.1, "error_wanda": 0.2}, {"error_final": 0.3, "error_wanda": 0.4}]}
    card = build_model_card(rep, repo_id="me/smol-60")
    d = card.data
    assert d.model_name == "me/smol-60" and d.datasets is None        # austen has no hub id
    assert [(e.task_name, e.metric_value) for e in d.eval_results] == [("Zero-shot boolq", 0.6123),
                                                                       ("Zero-shot rte", 0.5)]
    assert 'from_pretrained("me/smol-60")' in card.text and "60% unstructured" in card.text
    assert "mean 0.2000" in card.text and "--alpha 0.5 --iterations 0 --swaps 50 " in card.text


# ---------------------------------------------------------------------------- inspect
def test_inspect_real_24_prune_and_a_tampered_tensor(pruned_24, tmp_path, capsys):
    out, rep, _ = pruned_24
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


# ---------------------------------------------------------------------------- reload, shards
def test_pushed_layout_reloads_with_plain_transformers(pruned_24, tmp_path):
    out, _, logits = pruned_24
    dst = tmp_path / "logits.pt"
    code = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
            f"torch.save(m(torch.tensor({TOKEN_IDS})).logits.detach(), {str(dst)!r})\n"
            "assert not any(k.startswith('sparsefw') for k in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"          # as in this process (conftest): same float summation order
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
    torch.testing.assert_close(torch.load(dst), logits, rtol=0, atol=1e-5)
    sent = {f for f, _ in upload_plan(out)}
    assert sent == {f.name for f in out.iterdir() if f.is_file()}
    assert {"README.md", "report.json", "config.json", "model.safetensors", "tokenizer.json"} <= sent


def test_sharded_save_keeps_dtype_and_reloads(tmp_path, tokenizer):
    src = tmp_path / "bf16"
    tiny_model("llama", len(tokenizer), hidden=64).to(torch.bfloat16).save_pretrained(src)
    tokenizer.save_pretrained(src)
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


# ---------------------------------------------------------------------------- push
def test_dry_run_lists_what_upload_folder_sends(tmp_path, tokenizer, monkeypatch, capsys):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS

    d = save_tiny(tmp_path, tokenizer)
    for extra in (".git/config", ".cache/huggingface/x.lock", "sub/notes.txt"):
        (d / extra).parent.mkdir(parents=True, exist_ok=True)
        (d / extra).write_text("x")
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda *a, **k: None, raising=False)
    ops = HfApi()._prepare_upload_folder_additions(d, "", ignore_patterns=list(DEFAULT_IGNORE_PATTERNS))
    plan = push(d, "me/tiny", dry_run=True)
    assert [f for f, _ in plan["files"]] == [op.path_in_repo for op in ops]
    assert "sub/notes.txt" in dict(plan["files"]) and not any(f.startswith(".") for f, _ in plan["files"])
    assert plan["bytes"] == sum((d / f).stat().st_size for f, _ in plan["files"])
    assert cli_main(["push", str(d), "--repo-id", "me/tiny", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "repo: me/tiny" in text and "model.safetensors" in text


def test_push_calls_the_hub_api(pruned_24, fake_hub, monkeypatch):
    out, _, _ = pruned_24
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    res = push(out, "me/smol-24", private=True, revision="v1")
    names = [c[0] for c in fake_hub]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert fake_hub[0][1] == ("me/smol-24",) and fake_hub[0][2]["private"] is True and fake_hub[0][2]["exist_ok"]
    up = fake_hub[2][2]
    assert up["repo_id"] == "me/smol-24" and Path(up["folder_path"]) == out.resolve() and up["revision"] == "v1"
    assert 'from_pretrained("me/smol-24")' in (out / "README.md").read_text()    # card names the repo
    assert res["url"] == "https://huggingface.co/me/smol-24"


def test_no_token_sends_nothing(tmp_path, tokenizer, fake_hub, no_token, capsys):
    d = save_tiny(tmp_path, tokenizer)
    with pytest.raises(SparseFWError, match="no Hugging Face token"):
        push(d, "me/tiny")
    assert cli_main(["push", str(d), "--repo-id", "me/tiny"]) == 2
    assert "error: no Hugging Face token" in capsys.readouterr().err
    out = tmp_path / "o"        # prune --push-to-hub: checked before pruning, nothing written
    assert cli_main(["prune", "--model", str(d), "--method", "wanda", "--nsamples", "2", "--seqlen", "16",
                     "--output", str(out), "--push-to-hub", "me/tiny"]) == 2
    assert not out.exists() and fake_hub == []


def test_unreachable_hub_and_failed_upload(tmp_path, tokenizer, fake_hub, monkeypatch, capsys):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    d = save_tiny(tmp_path, tokenizer)

    def down(*a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(HfApi, "whoami", down)
    out = tmp_path / "o"
    assert cli_main(["prune", "--model", str(d), "--method", "wanda", "--nsamples", "2", "--seqlen", "16",
                     "--output", str(out), "--push-to-hub", "me/tiny"]) == 2
    assert "unreachable" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr(HfApi, "whoami", lambda *a, **k: {"name": "me"})
    monkeypatch.setattr(HfApi, "upload_folder", down)
    assert cli_main(["prune", "--model", str(d), "--method", "wanda", "--nsamples", "2", "--seqlen", "16",
                     "--output", str(out), "--push-to-hub", "me/tiny"]) == 2
    err = capsys.readouterr().err
    assert "upload to me/tiny failed" in err and "is kept" in err
    assert (out / "model.safetensors").exists() and (out / "report.json").exists()
    with pytest.raises(SparseFWError, match="USER/NAME"):
        push(out, "not a repo")
