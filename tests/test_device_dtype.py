"""Devices and dtypes (issue 13, part 1): the checkpoint's dtype is kept from load to save, the
solvers compute in float32/float64 on the weights' device, and an unavailable device is one clear
error before anything is written."""
import json

import pytest
import torch

from conftest import tiny_model
from sparsefw import api
from sparsefw.cli import main as cli_main
from sparsefw.errors import SparseFWError
from sparsefw.masks import parse_pattern, wanda_scores
from sparsefw.models import resolve_device, resolve_dtype

HAS_CUDA = torch.cuda.is_available()


def save_tiny(tmp_path, tokenizer, dtype=torch.float32):
    m = tiny_model("llama", len(tokenizer), hidden=64).to(dtype)
    d = tmp_path / f"src_{str(dtype).split('.')[-1]}"
    m.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def test_resolve_dtype_and_device():
    assert resolve_dtype("auto") == "auto" and resolve_dtype(None) == "auto"
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(SparseFWError, match="unknown dtype"):
        resolve_dtype("int8")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if HAS_CUDA else "cpu")
    with pytest.raises(SparseFWError, match="unknown device"):
        resolve_device("gpu7")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_exit_2_nothing_written(tmp_path, tokenizer, capsys):
    src = save_tiny(tmp_path, tokenizer)
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli_main(["prune", "--model", str(src), "--device", "cuda", "--nsamples", "2", "--seqlen", "16",
                     "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no CUDA device" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("method", ["wanda", "sparsefw", "sparsegpt"])
def test_bfloat16_checkpoint_stays_bfloat16(tmp_path, tokenizer, method):
    """A bf16 checkpoint is pruned and saved in bf16 (half the bytes of the fp32 run), with the
    exact sparsity; --dtype bfloat16 on an fp32 checkpoint gives the same as a bf16 checkpoint."""
    from transformers import AutoModelForCausalLM

    src32 = save_tiny(tmp_path, tokenizer, torch.float32)
    src16 = save_tiny(tmp_path, tokenizer, torch.bfloat16)
    opts = dict(method=method, sparsity=0.5, nsamples=4, seqlen=32, iterations=20, device="cpu", progress=False)
    r16 = api.prune(str(src16), output=str(tmp_path / "o16"), **opts)
    r32 = api.prune(str(src32), output=str(tmp_path / "o32"), **opts)
    rcast = api.prune(str(src32), output=str(tmp_path / "ocast"), dtype="bfloat16", **opts)
    rep16 = json.loads((tmp_path / "o16" / "report.json").read_text())
    assert rep16["dtype"] == "bfloat16" and rep16["device"] == "cpu"
    assert r32.report["dtype"] == "float32" and rcast.report["dtype"] == "bfloat16"
    assert rep16["achieved_sparsity"] == pytest.approx(0.5)
    size = {k: sum(f.stat().st_size for f in (tmp_path / k).glob("*.safetensors")) for k in ("o16", "o32")}
    assert 0.49 < size["o16"] / size["o32"] < 0.51
    re16 = AutoModelForCausalLM.from_pretrained(tmp_path / "o16")   # no dtype: the saved one
    assert all(p.dtype == torch.bfloat16 for p in re16.parameters())
    sd, sdc = r16.model.state_dict(), rcast.model.state_dict()
    for k, v in re16.state_dict().items():
        assert torch.equal(v, sd[k]) and torch.equal(v, sdc[k]), k
    # the bf16 masks are close to the fp32 ones (same calibration text, activations in bf16)
    names = [n for n in sd if n.endswith("proj.weight")]
    agree = sum(int(((sd[n] != 0) == (r32.model.state_dict()[n] != 0)).sum()) for n in names)
    total = sum(sd[n].numel() for n in names)
    assert agree / total > 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_layer_solvers_on_cuda_match_cpu():
    from sparsefw.fw import fw_solve
    from sparsefw.sparsegpt_sparsify import sparsegpt_prune

    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=g)
    X = torch.randn(128, 512, generator=g) * torch.rand(128, 1, generator=g)
    G = (X @ X.T).double()
    pat = parse_pattern("unstructured", 0.5)
    scores = wanda_scores(W, torch.diagonal(G).sqrt().float())
    cpu = fw_solve(W, G.float(), scores, pat, iterations=50)
    gpu = fw_solve(W.cuda(), G.float().cuda(), scores.cuda(), pat, iterations=50)
    assert gpu.mask.device.type == "cuda"
    assert (gpu.mask.cpu() == cpu.mask).float().mean() > 0.99
    assert gpu.error_final == pytest.approx(cpu.error_final, rel=1e-2)
    Wc, Mc = sparsegpt_prune(W, G, pat)
    Wg, Mg = sparsegpt_prune(W.cuda(), G.cuda(), pat)
    assert torch.allclose(Wg.cpu(), Wc, atol=1e-4) and torch.equal(Mg.cpu(), Mc)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt", "gpt2"])
def test_capture_runs_no_block(tokenizer, arch):
    """Sequential onloading: the first block's inputs and every block's extra arguments (Gemma3:
    different masks for sliding-window and full-attention layers) are captured with the blocks
    left on the meta device, i.e. never run nor materialized; they equal a real forward's."""
    from sparsefw.models import decoder_blocks
    from sparsefw.onload import capture_block_inputs

    m = tiny_model(arch, len(tokenizer), layers=6 if arch == "gemma3" else 3)   # gemma3: every 6th layer is full
    blocks = decoder_blocks(m)
    windows = torch.randint(0, len(tokenizer), (3, 40), generator=torch.Generator().manual_seed(0))
    seen = {}   # the real arguments of every block, from a full forward of window 0

    def record(i):
        def hook(mod, a, kw):
            seen.setdefault(i, (a[0].clone(), a[1:], {k: v for k, v in kw.items() if k != "past_key_values"}))
        return hook

    hooks = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad():
        m(windows[:1], use_cache=False)
    for h in hooks:
        h.remove()
    for b in blocks:
        b.to("meta")
    inps, extra = capture_block_inputs(m, blocks, windows)
    assert len(inps) == 3 and torch.equal(inps[0], seen[0][0])
    for i in range(len(blocks)):
        assert _same(extra[i][0], seen[i][1]) and _same(extra[i][1], seen[i][2]), i
    if arch == "gemma3":   # sliding-window (sliding_window=16 < 40) and full layers differ
        masks = [extra[i][1].get("attention_mask") for i in range(len(blocks))]
        assert any(not _same(masks[0], x) for x in masks[1:])
