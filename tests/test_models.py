"""Loading models (sparsefw/models.py): dtype and device resolution, the checkpoint's dtype kept from
load to save (bf16 in, bf16 out), and an unavailable device as one clear error before anything is
written."""
import json

import pytest
import torch

from sparsefw import api
from sparsefw.cli import main as cli_main
from sparsefw.errors import SparseFWError
from sparsefw.models import resolve_device, resolve_dtype


HAS_CUDA = torch.cuda.is_available()


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
def test_cuda_without_cuda_exit_2_nothing_written(tmp_path, save_tiny, capsys):
    src, _ = save_tiny("llama", hidden=64)
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli_main(["prune", "--model", str(src), "--device", "cuda", "--nsamples", "2", "--seqlen", "16",
                     "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no CUDA device" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("method,options", [("wanda", {}), ("sparsefw", {"iterations": 20}), ("sparsegpt", {})])
def test_bfloat16_checkpoint_stays_bfloat16(tmp_path, save_tiny, method, options):
    """A bf16 checkpoint is pruned and saved in bf16 (half the bytes of the fp32 run), with the
    exact sparsity; --dtype bfloat16 on an fp32 checkpoint gives the same as a bf16 checkpoint."""
    from transformers import AutoModelForCausalLM

    src32, _ = save_tiny("llama", name="src_float32", hidden=64)
    src16, _ = save_tiny("llama", name="src_bfloat16", dtype=torch.bfloat16, hidden=64)
    opts = dict(method=method, sparsity=0.5, nsamples=4, seqlen=32, device="cpu", progress=False, **options)
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
