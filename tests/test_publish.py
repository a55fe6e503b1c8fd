"""Publishing (sparsefw/publish.py): the source model (hub id, license, GGUF origin), the model card's
hub metadata, the pushed layout reloading with plain transformers, push (Hub calls recorded, never
made), and the errors of a push."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsefw.cli import main as cli_main
from sparsefw.errors import SparseFWError
from sparsefw.models import PACKAGED
from sparsefw.publish import build_model_card, push, source_info, upload_plan


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


def test_card_of_real_24_prune(pruned_24):
    from huggingface_hub import ModelCard

    out, rep = pruned_24.folder, pruned_24.report
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


def test_pushed_layout_reloads_with_plain_transformers(pruned_24, tmp_path):
    out, logits = pruned_24.folder, pruned_24.logits
    dst = tmp_path / "logits.pt"
    code = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
            f"torch.save(m(torch.tensor({pruned_24.token_ids})).logits.detach(), {str(dst)!r})\n"
            "assert not any(k.startswith('sparsefw') for k in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"          # as in this process (conftest): same float summation order
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
    torch.testing.assert_close(torch.load(dst), logits, rtol=0, atol=1e-5)
    sent = {f for f, _ in upload_plan(out)}
    assert sent == {f.name for f in out.iterdir() if f.is_file()}
    assert {"README.md", "report.json", "config.json", "model.safetensors", "tokenizer.json"} <= sent


def test_dry_run_lists_what_upload_folder_sends(tmp_path, save_tiny, monkeypatch, capsys):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS

    d, _ = save_tiny("llama", name="tiny", hidden=64)
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
    out = pruned_24.folder
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    res = push(out, "me/smol-24", private=True, revision="v1")
    names = [c[0] for c in fake_hub]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert fake_hub[0][1] == ("me/smol-24",) and fake_hub[0][2]["private"] is True and fake_hub[0][2]["exist_ok"]
    up = fake_hub[2][2]
    assert up["repo_id"] == "me/smol-24" and Path(up["folder_path"]) == out.resolve() and up["revision"] == "v1"
    assert 'from_pretrained("me/smol-24")' in (out / "README.md").read_text()    # card names the repo
    assert res["url"] == "https://huggingface.co/me/smol-24"


def test_no_token_sends_nothing(tmp_path, save_tiny, fake_hub, no_token, capsys):
    d, _ = save_tiny("llama", name="tiny", hidden=64)
    with pytest.raises(SparseFWError, match="no Hugging Face token"):
        push(d, "me/tiny")
    assert cli_main(["push", str(d), "--repo-id", "me/tiny"]) == 2
    assert "error: no Hugging Face token" in capsys.readouterr().err
    out = tmp_path / "o"        # prune --push-to-hub: checked before pruning, nothing written
    assert cli_main(["prune", "--model", str(d), "--method", "wanda", "--nsamples", "2", "--seqlen", "16",
                     "--output", str(out), "--push-to-hub", "me/tiny"]) == 2
    assert not out.exists() and fake_hub == []


def test_unreachable_hub_and_failed_upload(tmp_path, save_tiny, fake_hub, monkeypatch, capsys):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    d, _ = save_tiny("llama", name="tiny", hidden=64)

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
