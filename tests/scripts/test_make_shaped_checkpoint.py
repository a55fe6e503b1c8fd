"""scripts/make_shaped_checkpoint.py on a tiny override of each shape: the checkpoint loads with
plain transformers, a slice holds the same tensors as the full checkpoint, the norms carry the
outlier channels (so Wanda and magnitude differ), and the streaming prune accepts it."""
import json

import pytest
import torch

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 49152}


@pytest.fixture(scope="module")
def shaped(script):
    return script("make_shaped_checkpoint")


@pytest.mark.parametrize("shape", ["llama3-8b", "qwen2.5-7b"])
def test_tiny_shaped_checkpoint_loads_and_slices_agree(shaped, tmp_path, shape):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    full = shaped.write_checkpoint(shape, tmp_path / "full", blocks=3, overrides=TINY, progress=False)
    part = shaped.write_checkpoint(shape, tmp_path / "part", blocks=1, overrides=TINY, progress=False)
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["num_key_value_heads"] == 2
    assert cfg["rope_parameters"]["rope_theta"] == shaped.SHAPES[shape]["rope_parameters"]["rope_theta"]
    m = AutoModelForCausalLM.from_pretrained(full)
    assert m.dtype == torch.bfloat16 and len(m.model.layers) == 3
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[1, 2, 3]])).logits.float()).all()
    a = {k: v for f in full.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    b = {k: v for f in part.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert set(b) <= set(a)
    assert all(torch.equal(a[k], b[k]) for k in b)
    q = a["model.layers.0.self_attn.q_proj.weight"].float()
    assert abs(q.std().item() - 0.02) < 0.002
    norm = a["model.layers.0.input_layernorm.weight"].float()
    assert int((norm == 20).sum()) == 1 and int((norm == 1).sum()) == 63   # max(1, 0.5% of 64) outliers
    if shape == "qwen2.5-7b":
        assert "model.layers.0.self_attn.q_proj.bias" in a


def test_streamed_wanda_prune_of_a_shaped_slice(shaped, tmp_path):
    from sparsefw import api
    from sparsefw.inspection import inspect_checkpoint

    src = shaped.write_checkpoint("llama3-8b", tmp_path / "src", blocks=2, overrides=TINY, progress=False)
    rep = api.prune(str(src), output=str(tmp_path / "out"), stream=True, method="wanda", sparsity=0.5,
                    nsamples=2, seqlen=16, progress=False).report
    assert rep["dtype"] == "bfloat16"
    info = inspect_checkpoint(tmp_path / "out")
    assert info["pruned_layers"] == 14 and info["sparsity"] == pytest.approx(0.5)
