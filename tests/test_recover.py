"""Recovery by distillation (sparsefw/recover.py): the losses by hand, the mask kept bit for bit
(unstructured and 2:4), resume equal to an uninterrupted run, and bad input refused."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sparsefw import api
from sparsefw.cli import main as cli_main
from sparsefw.errors import SparseFWError
from sparsefw.recover import kl_loss, squarehead_loss

SMALL = dict(nsamples=8, seqlen=16, batch=2, warmup=1, calib="wiki")


def test_kl_loss_by_hand():
    t = torch.tensor([[0.0, 0.0]])                       # teacher p = (1/2, 1/2)
    s = torch.tensor([[math.log(3.0), 0.0]])             # student q = (3/4, 1/4)
    # KL(p || q) = 1/2 ln(2/3) + 1/2 ln(2) = 1/2 ln(4/3)
    assert float(kl_loss(s, t)) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert float(kl_loss(t, t)) == 0.0
    # temperature 2: logits halved, loss scaled by 4
    q = torch.softmax(s / 2, -1)[0]
    assert float(kl_loss(s, t, 2.0)) == pytest.approx(4 * 0.5 * float(torch.log(0.5 / q).sum()), rel=1e-6)
    with pytest.raises(SparseFWError, match="vocabulary"):
        kl_loss(torch.zeros(1, 3), torch.zeros(1, 2))


def test_squarehead_loss_by_hand():
    h = [torch.ones(1, 2, 3), 2 * torch.ones(1, 2, 3)]
    assert float(squarehead_loss(h, h)) == 0.0
    assert float(squarehead_loss([2 * x for x in h], h)) == pytest.approx(1.0)   # ||h||^2 / ||h||^2 per block


@pytest.fixture
def pruned(tmp_path, save_tiny):
    """(dense folder, pruned folder) for a pattern: a tiny Llama pruned with Wanda."""
    def make(pattern):
        src, _ = save_tiny("llama", name="dense")
        out = tmp_path / f"pruned_{pattern.replace(':', 'of')}"
        api.prune(str(src), output=str(out), method="wanda", pattern=pattern, progress=False, nsamples=4, seqlen=32)
        return src, out
    return make


def _tensors(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_recovery_keeps_the_mask_bit_for_bit(tmp_path, pruned, pattern):
    from sparsefw.inspection import inspect_checkpoint

    dense, student = pruned(pattern)
    out = tmp_path / "rec"
    res = api.recover(str(student), str(dense), str(out), steps=3, lr=1e-3, progress=False, **SMALL)
    before, after = _tensors(student), _tensors(out)
    layers = [k for k in before if k.endswith("proj.weight")]
    assert layers
    for k in layers:
        assert torch.equal(before[k] != 0, after[k] != 0), k                # the same mask, bit for bit
    assert any(not torch.equal(before[k], after[k]) for k in layers)       # the kept weights trained
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "wanda" and rep["recovery"]["steps"] == 3
    assert rep["recovery"]["achieved_sparsity"] == pytest.approx(0.5)
    assert res.report["recovery"]["losses"][0][0] == 1 and "## Recovery" in (out / "README.md").read_text()
    if pattern == "2:4":
        assert inspect_checkpoint(out, pattern="2:4")["pattern_holds"]


def test_resume_equals_an_uninterrupted_run(tmp_path, pruned, monkeypatch):
    import sparsefw.recover as recover

    dense, student = pruned("unstructured")
    opts = dict(steps=4, lr=1e-3, checkpoint_every=2, progress=False, eval_ppl=True, ppl_source="wiki",
                ppl_seqlen=16, ppl_chunks=2, ppl_every=1, **SMALL)
    ref = api.recover(str(student), str(dense), str(tmp_path / "ref"), **opts).report
    calls, kl = [], recover.kl_loss

    def crash_at_step_3(*a, **k):                      # a power loss after step 2's checkpoint
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return kl(*a, **k)
    monkeypatch.setattr(recover, "kl_loss", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        api.recover(str(student), str(dense), str(tmp_path / "out"), **opts)
    monkeypatch.setattr(recover, "kl_loss", kl)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SparseFWError, match="--resume"):
        api.recover(str(student), str(dense), str(tmp_path / "out"), **opts)
    before = torch.load(tmp_path / "out.partial" / "recover_state.pt", weights_only=False)["seconds"]
    rep = api.recover(str(student), str(dense), str(tmp_path / "out"), resume=True, **opts).report
    assert rep["recovery"]["resumed_from"] == 2
    assert 0 < before < rep["recovery"]["seconds"]           # training time (and --minutes) spans the resume
    a, b = _tensors(tmp_path / "ref"), _tensors(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the perplexity curve keeps the points measured before the crash (steps 1, 2), once each
    assert [x[0] for x in rep["recovery"]["ppl_curve"]] == [0, 1, 2, 3, 4]
    assert rep["recovery"]["ppl_curve"] == ref["recovery"]["ppl_curve"]


def test_bad_input_one_error_line_nothing_written(tmp_path, pruned, save_tiny, make_tiny, bos_tokenizer, capsys):
    dense, student = pruned("unstructured")
    # a teacher with another vocabulary and tokenizer
    other = tmp_path / "other"
    make_tiny("llama", len(bos_tokenizer)).save_pretrained(other)
    bos_tokenizer.save_pretrained(other)
    out = tmp_path / "out"
    assert cli_main(["recover", "--model", str(student), "--teacher", str(other), "--output", str(out)]) == 2
    assert "vocabulary" in capsys.readouterr().err and not out.exists()
    # a student that is not sparse
    assert cli_main(["recover", "--model", str(dense), "--teacher", str(dense), "--output", str(out)]) == 2
    assert "not sparse" in capsys.readouterr().err and not out.exists()
    # an unreadable text
    assert cli_main(["recover", "--model", str(student), "--teacher", str(dense), "--output", str(out),
                     "--calib", str(tmp_path / "missing.txt")]) == 2
    errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "missing.txt" in errors[0] and not out.exists()


def test_recovered_model_keeps_the_checkpoint_dtype(tmp_path, save_tiny):
    """A bf16 pruned checkpoint trains in float32 and is saved in bf16 again, with its mask."""
    src, _ = save_tiny("llama", name="dense16", dtype=torch.bfloat16)
    pruned = tmp_path / "p16"
    api.prune(str(src), output=str(pruned), method="wanda", sparsity=0.5, progress=False, nsamples=4, seqlen=32)
    api.recover(str(pruned), str(src), str(tmp_path / "r16"), steps=2, lr=1e-3, progress=False, **SMALL)
    before, after = _tensors(pruned), _tensors(tmp_path / "r16")
    layers = [k for k in before if k.endswith("proj.weight")]
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(before[k] != 0, after[k] != 0) for k in layers)


def test_masked_lora_by_hand():
    """W = [[1, 0, 2, 0]], M = W != 0, B A = [[1, 1, 1, 1]]: W + (B A) ⊙ M = [[2, 0, 3, 0]] exactly,
    before and after the merge."""
    from sparsefw.recover import add_masked_lora, merge_masked_lora

    lin = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0, 2.0, 0.0]]))
    model = torch.nn.Sequential(lin)
    owners = add_masked_lora(model, [(lin.weight, lin.weight.detach() != 0)], rank=1)
    plug = lin.parametrizations.weight[0]
    assert float(plug.B.detach().abs().sum()) == 0.0                        # starts as the identity map
    assert torch.equal(lin.weight, torch.tensor([[1.0, 0.0, 2.0, 0.0]]))
    with torch.no_grad():
        plug.A.fill_(1.0)
        plug.B.fill_(1.0)
    expect = torch.tensor([[2.0, 0.0, 3.0, 0.0]])
    assert torch.equal(lin.weight, expect)
    x = torch.tensor([[1.0, 10.0, 100.0, 1000.0]])
    assert float(model(x).detach()) == 302.0
    merge_masked_lora(owners)
    assert not hasattr(lin, "parametrizations") and torch.equal(lin.weight, expect)
    assert float(model(x).detach()) == 302.0


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_lora_recovery_keeps_the_mask(tmp_path, pruned, pattern):
    """--train lora: the adapters are merged into the kept weights; the mask is unchanged bit for bit,
    and the saved checkpoint holds no adapter tensor."""
    dense, student = pruned(pattern)
    out = tmp_path / "lora"
    rep = api.recover(str(student), str(dense), str(out), steps=3, lr=1e-2, train="lora", lora_rank=2,
                      progress=False, **SMALL).report
    before, after = _tensors(student), _tensors(out)
    assert before.keys() == after.keys()                             # no adapter or parametrization left
    layers = [k for k in before if k.endswith("proj.weight")]
    for k in layers:
        assert torch.equal(before[k] != 0, after[k] != 0), k
    assert sum(not torch.equal(before[k], after[k]) for k in layers) == len(layers)   # every adapter trained
    assert rep["recovery"]["train"] == "lora" and rep["recovery"]["lora_rank"] == 2
    from sparsefw.publish import push                  # the recovered folder is publishable as it is

    plan = push(out, "me/tiny-rec", dry_run=True)
    assert {"README.md", "model.safetensors", "report.json"} <= {p for p, _ in plan["files"]}
    assert "## Recovery" in (out / "README.md").read_text() and "(rank 2)" in (out / "README.md").read_text()


def test_budgets_and_gradient_checkpointing(tmp_path, pruned):
    """--tokens fixes the steps; --minutes stops after the first step past it (the output is still a
    finished checkpoint); gradient checkpointing gives the same model up to float rounding."""
    dense, student = pruned("unstructured")
    per_step = SMALL["batch"] * SMALL["seqlen"]
    r = api.recover(str(student), str(dense), str(tmp_path / "t"), tokens=3 * per_step - 1, lr=1e-3,
                    progress=False, **SMALL).report["recovery"]
    assert r["steps"] == 3 and r["tokens"] == 3 * per_step and not r["stopped_early"]
    r = api.recover(str(student), str(dense), str(tmp_path / "m"), steps=50, minutes=1e-9, lr=1e-3,
                    progress=False, **SMALL).report["recovery"]
    assert r["steps"] == 1 and r["steps_planned"] == 50 and r["stopped_early"]
    assert not (tmp_path / "m.partial").exists() and (tmp_path / "m" / "model.safetensors").is_file()
    api.recover(str(student), str(dense), str(tmp_path / "gc"), steps=3, lr=1e-3, gradient_checkpointing=True,
                progress=False, **SMALL)
    api.recover(str(student), str(dense), str(tmp_path / "nogc"), steps=3, lr=1e-3, progress=False, **SMALL)
    a, b = _tensors(tmp_path / "gc"), _tensors(tmp_path / "nogc")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], _tensors(student)[k]) for k in a)


def test_cli_recover_flags(tmp_path, pruned, capsys):
    dense, student = pruned("unstructured")
    out = tmp_path / "cli"
    assert cli_main(["recover", "--model", str(student), "--teacher", str(dense), "--output", str(out),
                     "--steps", "3", "--train", "lora", "--lora-rank", "2", "--gradient-checkpointing",
                     "--nsamples", "4", "--seqlen", "16", "--batch", "2", "--calib", "wiki", "--eval-ppl",
                     "--ppl-seqlen", "32", "--ppl-chunks", "2", "--ppl-every", "2"]) == 0
    rec = json.loads((out / "report.json").read_text())["recovery"]
    assert rec["gradient_checkpointing"] is True and rec["lora_rank"] == 2 and rec["steps"] == 3
    curve = rec["ppl_curve"]                          # before, every 2 steps, after: (step, tokens, ppl)
    assert [c[:2] for c in curve] == [[0, 0], [2, 64], [3, 96]]
    assert curve[0][2] == rec["ppl_before"] and curve[-1][2] == rec["ppl_after"] and rec["ppl_after"] > 1
    assert "recovered 3 steps" in capsys.readouterr().out
    assert cli_main(["recover", "--model", str(student), "--teacher", str(dense), "--output", str(tmp_path / "x"),
                     "--minutes", "-1"]) == 2
