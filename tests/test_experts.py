"""Mixture-of-experts models: every expert's slice of the fused 3-D expert weights is pruned on
the tokens the router sends to it; routers and unknown weights are never pruned silently."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sparsefw import api
from sparsefw.capture import capture_block_inputs, evaluate_grams
from sparsefw.config import PruneConfig
from sparsefw.errors import SparseFWError
from sparsefw.experts import ExpertLinear, routed_experts, saved_tensor_names
from sparsefw.masks import magnitude_scores, parse_pattern, select
from sparsefw.models import decoder_blocks, get_weight, prunable_layers
from sparsefw.pipeline import check_prunable, prune_model



def _windows(vocab: int, n: int = 4, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


def _moe_blocks(model) -> list:
    """The decoder blocks with routed experts (DeepSeek-V3's first block is dense)."""
    return [b for b in decoder_blocks(model) if hasattr(b.mlp, "experts")]


def test_prunable_layers_are_expert_slices_and_not_the_router(make_tiny, moe_arch):
    m = make_tiny(moe_arch, 64)
    block = _moe_blocks(m)[0]
    layers = prunable_layers(block)
    experts = block.mlp.experts
    E = experts.down_proj.shape[0]
    names = [n for n in layers if n.startswith("mlp.experts.")]
    assert names == [f"mlp.experts.{p}[{e}]" for e in range(E) for p in ("gate_up_proj", "down_proj")]
    assert not any(n.endswith("gate") for n in layers)          # the router stays dense
    lay = layers["mlp.experts.down_proj[2]"]
    assert isinstance(lay, ExpertLinear)
    W = get_weight(lay)                          # (d_out, d_in) = (hidden, f), a view of the fused tensor
    assert W.data_ptr() == experts.down_proj[2].data_ptr() and W.shape[0] == m.config.hidden_size
    torch.testing.assert_close(lay(torch.ones(1, W.shape[1])), torch.ones(1, W.shape[1]) @ W.T + (
        experts.down_proj_bias[2] if hasattr(experts, "down_proj_bias") else 0))


def test_routed_forward_equals_the_model_forward(make_tiny, moe_arch):
    m = make_tiny(moe_arch, 64)
    x = _windows(64, 1)
    with torch.no_grad():
        ref = m(x).logits
        with routed_experts(decoder_blocks(m)[0]), routed_experts(decoder_blocks(m)[1]):
            got = m(x).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe"])
def test_expert_gram_is_over_exactly_the_routed_tokens(make_tiny, arch):
    """G of expert e's gate_up = sum of x x^T over the tokens whose router top-k holds e; G of its
    down_proj = the same over act(x W_gate^T) * (x W_up^T); reference computed here from the router's
    logits, top-k by hand."""
    m = make_tiny(arch, 64)
    blocks = decoder_blocks(m)
    inps, extra = capture_block_inputs(m, blocks, _windows(64))
    block = blocks[0]
    moe_in = []
    hd = block.mlp.register_forward_pre_hook(lambda mod, args: moe_in.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for h in inps:
            block(h, *extra[0][0], **extra[0][1])
    hd.remove()
    X = torch.cat(moe_in).double()                                    # (tokens, d)
    experts, k = block.mlp.experts, m.config.num_experts_per_tok
    logits = X @ block.mlp.gate.weight.double().T
    top = torch.topk(torch.softmax(logits, -1), k, dim=-1).indices      # (tokens, k)
    grams = evaluate_grams(block, inps, extra[0])
    f = experts.down_proj.shape[2]
    for e in range(experts.down_proj.shape[0]):
        Xe = X[(top == e).any(1)]
        assert Xe.shape[0] > 0
        gu = Xe @ experts.gate_up_proj[e].detach().double().T
        H = F.silu(gu[:, :f]) * gu[:, f:]
        for name, ref in ((f"mlp.experts.gate_up_proj[{e}]", Xe.T @ Xe), (f"mlp.experts.down_proj[{e}]", H.T @ H)):
            # float32 window products: ~1e-7 of the largest entry; a wrong token set differs by O(1)
            torch.testing.assert_close(grams[name], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_moe_prune_save_reload_every_expert_at_target(tmp_path, tokenizer, save_tiny, moe_arch):
    from transformers import AutoModelForCausalLM

    from sparsefw.inspection import inspect_checkpoint

    src, _ = save_tiny(moe_arch)
    out = tmp_path / "pruned"
    res = api.prune(str(src), output=str(out), method="sparsefw", sparsity=0.5, progress=False,
                    nsamples=4, seqlen=32, min_expert_tokens=1)
    rep = json.loads((out / "report.json").read_text())
    nmoe = len(_moe_blocks(res.model))
    E = _moe_blocks(res.model)[0].mlp.experts.down_proj.shape[0]
    assert rep["expert_layers"] == 2 * E * nmoe
    assert rep["achieved_sparsity"] == pytest.approx(0.5)
    # every prunable matrix of the saved checkpoint, experts included: 50% zeros (in transformers' saved
    # layout: gate, up and down of every expert, or the fused gate_up and down of gpt-oss)
    info = inspect_checkpoint(out)
    rows = [r for r in info["layers"] if ".experts." in r["name"]]
    assert len(rows) == (2 if moe_arch == "gpt_oss" else 3) * E * nmoe and info["expert_layers"] == len(rows)
    assert all(r["sparsity"] == 0.5 for r in info["layers"]) and len(info["layers"]) > len(rows)
    re = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for block in _moe_blocks(re):
        for name, layer in prunable_layers(block).items():      # (d_out, d_in) views, in either layout
            if isinstance(layer, ExpertLinear):
                W = get_weight(layer)
                assert ((W != 0).sum(1) == W.shape[1] // 2).all(), name
        router = next(m for n, m in block.mlp.named_children() if n in ("gate", "router"))
        assert (router.weight != 0).all()                          # router dense
    x = torch.randint(0, len(tokenizer), (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(re(x).logits, res.model(x).logits, rtol=0, atol=0)
    card = (out / "README.md").read_text()
    assert f"| {2 * E * nmoe} (0) |" in card and "MoE expert weights: sparsity 0.5000" in card


def test_expert_with_too_few_tokens_falls_back_to_magnitude(make_tiny, tokenizer):
    m = make_tiny("mixtral", len(tokenizer))
    before = {n: get_weight(l).clone() for n, l in prunable_layers(decoder_blocks(m)[0]).items()}
    cfg = PruneConfig(method="wanda", sparsity=0.5, nsamples=2, seqlen=16, device="cpu", min_expert_tokens=10 ** 6)
    res = prune_model(m, tokenizer, cfg, windows=_windows(len(tokenizer), 2, 16), progress=False)
    assert res["expert_layers"] == 16 and res["experts_fallback"] == 16
    pat = parse_pattern("unstructured", 0.5)
    for n, W in before.items():
        got = get_weight(prunable_layers(decoder_blocks(m)[0])[n])
        if "experts" in n:                                           # magnitude's mask, exactly
            assert torch.equal(got != 0, select(magnitude_scores(W), pat)), n


def test_unknown_3d_parameter_fails_in_one_line_unless_skipped(make_tiny, tokenizer):
    m = make_tiny("llama", len(tokenizer))
    decoder_blocks(m)[1].mlp.register_parameter("fused_extra", torch.nn.Parameter(torch.randn(2, 8, 32)))
    pat = parse_pattern("unstructured", 0.5)
    with pytest.raises(SparseFWError, match=r"model\.layers\.1\.mlp\.fused_extra, shape \(2, 8, 32\).*--skip-unknown"):
        check_prunable(m, pat)
    assert len(check_prunable(m, pat, skip_unknown=True)) == 14
    cfg = PruneConfig(method="magnitude", sparsity=0.5, nsamples=2, seqlen=16, device="cpu", skip_unknown=True)
    res = prune_model(m, tokenizer, cfg, windows=_windows(len(tokenizer), 2, 16), progress=False)
    assert res["unpruned_unknown"] == ["model.layers.1.mlp.fused_extra"]


def test_saved_tensor_names_follow_transformers_layout(make_tiny):
    m = make_tiny("mixtral", 64, layers=1)
    names = check_prunable(m, parse_pattern("unstructured", 0.5))
    saved = saved_tensor_names(m, names)
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in saved
    assert "model.layers.0.self_attn.q_proj.weight" in saved and len(saved) == 4 + 3 * 4


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_drop_experts_removes_the_lowest_reap_scores(tmp_path, tokenizer, save_tiny, arch):
    """--drop-experts 1: REAP S_j = mean over the tokens routed to expert j of (routing weight x
    ||expert output||), computed here by hand for block 0 from the dense model's MoE inputs and the
    router's softmax top-k; the lowest-scoring expert is removed from the fused weights and the
    router; the saved model reloads with transformers (one router output fewer) and runs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src, dense = save_tiny(arch)
    windows = _windows(len(tokenizer))
    moe = dense.model.layers[0].mlp
    xs = []
    hd = moe.register_forward_pre_hook(lambda mod, args: xs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for w in windows:
            dense(w[None])
    hd.remove()
    X = torch.cat(xs).double()
    k, E = dense.config.num_experts_per_tok, moe.experts.down_proj.shape[0]
    probs = torch.softmax(X @ moe.gate.weight.detach().double().T, -1)
    top_p, top_i = torch.topk(probs, k, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True)                     # both models normalise the top-k
    f = moe.experts.down_proj.shape[2]
    S = []
    for e in range(E):
        tok, pos = torch.where(top_i == e)
        gu = X[tok] @ moe.experts.gate_up_proj[e].detach().double().T
        y = (F.silu(gu[:, :f]) * gu[:, f:]) @ moe.experts.down_proj[e].detach().double().T
        S.append(float((top_p[tok, pos] * y.norm(dim=-1)).mean()))
    cfg = PruneConfig(method="wanda", sparsity=0.5, device="cpu", min_expert_tokens=1, drop_experts=1)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    res = prune_model(model, tokenizer, cfg, windows=windows, progress=False)
    got = res["dropped_experts"]["model.layers.0"]["mlp.experts"]
    assert got["scores"] == pytest.approx(S, rel=1e-5)
    assert got["dropped"] == [min(range(E), key=lambda e: S[e])]
    out = tmp_path / "dropped"
    model.save_pretrained(out)
    re = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert AutoConfig.from_pretrained(out).num_experts == E - 1
    for b in decoder_blocks(re):
        assert b.mlp.gate.weight.shape[0] == E - 1 and b.mlp.experts.down_proj.shape[0] == E - 1
    kept = [e for e in range(E) if e not in got["dropped"]]
    torch.testing.assert_close(re.model.layers[0].mlp.gate.weight, dense.model.layers[0].mlp.gate.weight[kept])
    x = torch.randint(0, len(tokenizer), (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(re(x).logits, model(x).logits, rtol=0, atol=0)


def test_drop_experts_needs_experts_and_enough_of_them(make_tiny, tokenizer):
    cfg = PruneConfig(method="magnitude", sparsity=0.5, nsamples=2, seqlen=16, device="cpu", drop_experts=1)
    with pytest.raises(SparseFWError, match="has none"):
        prune_model(make_tiny("llama", len(tokenizer)), tokenizer, cfg, windows=_windows(len(tokenizer), 2, 16),
                    progress=False)
    cfg = PruneConfig(method="magnitude", sparsity=0.5, nsamples=2, seqlen=16, device="cpu", drop_experts=3)
    with pytest.raises(SparseFWError, match="fewer than the router's top-k"):
        prune_model(make_tiny("mixtral", len(tokenizer)), tokenizer, cfg, windows=_windows(len(tokenizer), 2, 16),
                    progress=False)


@pytest.mark.parametrize("method,options", [("magnitude", {}), ("ria", {}), ("swaps", {}),
                                            ("sparsefw", {"reconstruct": True, "iterations": 5}),
                                            ("sparsegpt", {"pattern": "2:4"})])
def test_every_method_prunes_every_expert(make_tiny, tokenizer, method, options):
    """Each method (masks, swaps, FW + reconstruction, SparseGPT's own weight updates, N:M) reaches the
    pattern in every expert slice of a tiny Mixtral, and the router stays dense."""
    m = make_tiny("mixtral", len(tokenizer))
    opts = dict(options)
    pattern, reconstruct = opts.pop("pattern", "unstructured"), opts.pop("reconstruct", False)
    cfg = PruneConfig(method=method, sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern,
                      reconstruct=reconstruct, nsamples=2, seqlen=32, device="cpu", min_expert_tokens=1, **opts)
    res = prune_model(m, tokenizer, cfg, windows=_windows(len(tokenizer), 2, 32), progress=False)
    assert res["expert_layers"] == 16 and res["experts_fallback"] == 0
    for block in decoder_blocks(m):
        for W in [*block.mlp.experts.gate_up_proj, *block.mlp.experts.down_proj]:
            if pattern == "2:4":
                assert ((W != 0).view(W.shape[0], -1, 4).sum(-1) == 2).all()
            else:
                assert ((W != 0).sum(1) == W.shape[1] // 2).all()
        assert (block.mlp.gate.weight != 0).all()


def test_transposed_experts_keep_n_of_m_along_their_inputs(tmp_path, tokenizer, save_tiny):
    """gpt-oss stores experts as (experts, d_in, d_out): a 2:4 prune groups every 4 consecutive inputs
    of an output, i.e. along dim 1 of the stored slice, and inspect checks it that way."""
    from safetensors.torch import load_file

    from sparsefw.inspection import inspect_checkpoint

    src, _ = save_tiny("gpt_oss")
    out = tmp_path / "o"
    api.prune(str(src), output=str(out), method="wanda", pattern="2:4", progress=False, nsamples=4, seqlen=32,
              min_expert_tokens=1)
    info = inspect_checkpoint(out, pattern="2:4")
    assert info["pattern_holds"] and info["expert_layers"] == 2 * 4 * 2
    t = load_file(out / "model.safetensors")["model.layers.0.mlp.experts.down_proj"]   # (4, f, hidden)
    assert ((t[1].t() != 0).reshape(t.shape[2], -1, 4).sum(-1) == 2).all()
    assert not ((t[1] != 0).reshape(t.shape[1], -1, 4).sum(-1) == 2).all()
