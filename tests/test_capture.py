"""Capture of calibration statistics (sparsefw/capture.py): the first block's inputs and every
block's extra arguments captured without running a block, every Linear's Gram matrix equal to
X^T X of the inputs it really receives, and NaN/Inf activations reported."""
import pytest
import torch

from sparsefw.capture import block_forward, capture_block_inputs, evaluate_grams
from sparsefw.cli import main as cli_main
from sparsefw.distributed import Ranks
from sparsefw.models import decoder_blocks, prunable_layers


def _same(a, b) -> bool:
    """a and b equal: tensors (shape and values), tuples / lists / dicts of them, other values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3", "opt", "gpt2", "mixtral",
                                  "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_capture_runs_no_block(tokenizer, make_tiny, arch):
    """Sequential onloading: the first block's inputs and every block's extra arguments (Gemma3:
    different masks for sliding-window and full-attention layers) are captured with the blocks
    left on the meta device, i.e. never run nor materialized; they equal a real forward's."""
    m = make_tiny(arch, len(tokenizer), layers=6 if arch == "gemma3" else 3)   # gemma3: every 6th layer is full
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


def test_grams_equal_each_layers_own_inputs(tokenizer, make_tiny, arch):
    """G of every Linear equals X^T X of the inputs that layer really receives (captured
    independently). Regression: a per-sample cache keyed by data_ptr() handed gate/up the Gram of
    q/k/v when the allocator reused the freed attention input's address."""
    torch.manual_seed(0)
    m = make_tiny(arch, len(tokenizer), hidden=64).eval()
    windows = torch.randint(0, len(tokenizer), (3, 24))
    blocks = decoder_blocks(m)
    inps, extra = capture_block_inputs(m, blocks, windows)
    layers = prunable_layers(blocks[0])
    for _ in range(3):  # repeat: address reuse depends on the allocator's state
        grams = evaluate_grams(blocks[0], inps, extra[0])
        seen = {n: torch.zeros_like(g) for n, g in grams.items()}

        def make_hook(n):
            def hook(mod, inp, out):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                seen[n] += x.t() @ x
            return hook

        hs = [l.register_forward_hook(make_hook(n)) for n, l in layers.items()]
        with torch.no_grad():
            for h in inps:
                block_forward(blocks[0], h, extra[0])
        for hd in hs:
            hd.remove()
        for n in grams:
            # fp32 per-sample products vs fp64 here: ~1e-7 relative; the bug gave O(1)
            assert float((grams[n] - seen[n]).norm() / seen[n].norm()) < 1e-5, n


def test_nan_activations_are_reported(tmp_path, tokenizer, save_tiny, capsys):
    _, m = save_tiny("llama")
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    bad = tmp_path / "nan_model"
    m.save_pretrained(bad)
    tokenizer.save_pretrained(bad)
    out = tmp_path / "out"
    assert cli_main(["prune", "--model", str(bad), "--nsamples", "2", "--seqlen", "16", "--output", str(out)]) == 2
    assert "NaN/Inf" in capsys.readouterr().err
    assert not out.exists()


def test_kept_inputs_give_the_bits_of_a_second_forward(tokenizer, make_tiny, arch, monkeypatch):
    """The first pass keeps the layer inputs when they fit GRAM_INPUT_CACHE_BYTES: the block runs
    once per window instead of twice, and every Gram sum has the same bits as with a second forward
    (budget 0)."""
    from sparsefw import capture

    torch.manual_seed(0)
    m = make_tiny(arch, len(tokenizer), hidden=64).eval()
    blocks = decoder_blocks(m)
    inps, extra = capture_block_inputs(m, blocks, torch.randint(0, len(tokenizer), (3, 24)))
    calls = []
    blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    groups = capture.layer_groups(blocks[0], inps, extra[0], Ranks())
    calls.clear()
    kept = capture.accumulate_grams(blocks[0], inps, extra[0], groups)
    n_kept = len(calls)
    monkeypatch.setattr(capture, "GRAM_INPUT_CACHE_BYTES", 0)
    calls.clear()
    again = capture.accumulate_grams(blocks[0], inps, extra[0], groups)
    assert (n_kept, len(calls)) == (len(inps), 2 * len(inps))
    for rep in kept:
        assert all(torch.equal(a, b) for a, b in zip(kept[rep].tensors(), again[rep].tensors())), rep
        assert kept[rep].tokens == again[rep].tokens
