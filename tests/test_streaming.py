"""Streaming (sparsefw/streaming.py): a checkpoint pruned block by block from its safetensors shards,
never whole in memory, gives a sharded checkpoint with the in-memory run's tensors."""
import json

import pytest
import torch
from safetensors.torch import load_file

from sparsefw import api
from sparsefw.errors import SparseFWError


def tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("arch,method,extra", [("llama", "sparsefw", {"reconstruct": True, "iterations": 20}),
                                               ("gemma3", "sparsegpt", {}),
                                               ("gpt2", "wanda", {"pattern": "2:4"}),
                                               ("llama", "sparsefw", {"owl": True, "true_sequential": True,
                                                                      "iterations": 20}),
                                               # fused experts, read and written per expert in the saved layout
                                               ("qwen3_moe", "sparsefw", {"iterations": 10, "min_expert_tokens": 1}),
                                               ("mixtral", "wanda", {"pattern": "2:4"}),
                                               ("qwen3_moe", "wanda", {"drop_experts": 1, "min_expert_tokens": 1})])
def test_stream_equals_in_memory(tmp_path, tokenizer, make_tiny, arch, method, extra):
    from transformers import AutoModelForCausalLM

    m = make_tiny(arch, len(tokenizer), hidden=64, layers=3)
    src = tmp_path / "src"
    m.save_pretrained(src, max_shard_size="150KB")      # several input shards
    tokenizer.save_pretrained(src)
    assert len(list(src.glob("*.safetensors"))) > 2
    opts = dict(method=method, sparsity=0.5, nsamples=4, seqlen=32, device="cpu", progress=False, **extra)
    mem = api.prune(str(src), output=str(tmp_path / "mem"), **opts)
    rep = api.prune(str(src), output=str(tmp_path / "stream"), stream=True, **opts).report
    a, b = tensors(tmp_path / "mem"), tensors(tmp_path / "stream")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 + 1 and set(index["weight_map"]) == set(b)
    assert rep["stream"] and rep["achieved_sparsity"] == pytest.approx(0.5, abs=0.01 if extra.get("owl") else 1e-9)
    assert rep["owl"] == mem.report["owl"]
    assert [L["error_final"] for L in rep["layers"]] == [L["error_final"] for L in mem.report["layers"]]
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    x = torch.randint(0, len(tokenizer), (1, 12))
    with torch.no_grad():
        assert torch.equal(re(x).logits, mem.model(x).logits)


def test_stream_needs_output_and_no_eval(tmp_path, tokenizer, make_tiny):
    m = make_tiny("llama", len(tokenizer))
    m.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    with pytest.raises(SparseFWError, match="give --output"):
        api.prune(str(tmp_path / "src"), stream=True, nsamples=2, seqlen=16)
    with pytest.raises(SparseFWError, match="eval-ppl"):
        api.prune(str(tmp_path / "src"), output=str(tmp_path / "o"), stream=True, eval_ppl=True,
                  nsamples=2, seqlen=16)
    assert not (tmp_path / "o").exists()


def test_rest_groups_by_size():
    from sparsefw.streaming import rest_groups

    assert rest_groups({"a": 3, "b": 3, "c": 5, "d": 1}, limit=6) == [["a", "b"], ["c", "d"]]
    assert rest_groups({"big": 10, "x": 1, "y": 5}, limit=6) == [["big"], ["x", "y"]]
    assert rest_groups({}, limit=6) == []


def test_stream_writes_outside_tensors_in_small_shards(tmp_path, tokenizer, make_tiny, monkeypatch):
    """With a shard limit below every tensor, the embeddings, the final norm and the LM head get a
    shard each (one in memory at a time), and the checkpoint still equals the in-memory run's."""
    import sparsefw.streaming as streaming

    m = make_tiny("llama", len(tokenizer))
    src = tmp_path / "src"
    m.save_pretrained(src)
    tokenizer.save_pretrained(src)
    monkeypatch.setattr(streaming, "REST_SHARD_BYTES", 1)
    opts = dict(method="magnitude", sparsity=0.5, nsamples=2, seqlen=16, device="cpu", progress=False)
    api.prune(str(src), output=str(tmp_path / "stream"), stream=True, **opts)
    api.prune(str(src), output=str(tmp_path / "mem"), **opts)
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())["weight_map"]
    outside = ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    assert len(set(index.values())) == 2 + 3 and len({index[n] for n in outside}) == 3
    a, b = tensors(tmp_path / "mem"), tensors(tmp_path / "stream")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
