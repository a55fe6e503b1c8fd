"""Perplexity (sparsefw/evaluate.py): with BOS-prefixed chunks it equals lm-eval's rolling
log-likelihood (tiny models, and the packaged gemma-3-270m on BoolQ)."""
import math

import pytest
import torch

from sparsefw.calibration import bos_token_id, eval_chunks
from sparsefw.evaluate import perplexity


def lm_eval_rolling_ppl(model, tokenizer, chunks: torch.Tensor) -> float:
    """exp(-sum of lm-eval's rolling log-likelihoods / tokens) of the chunks' text (BOS dropped):
    lm-eval scores every token, the first one given its prefix token (the tokenizer's BOS)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    strings = [tokenizer.decode(c[1:]) for c in chunks]
    for s, c in zip(strings, chunks):   # the strings tokenize back to the chunk's text tokens
        assert tokenizer(s, add_special_tokens=False)["input_ids"] == c[1:].tolist()
    # add_bos_token=False: lm-eval adds BOS only as the rolling prefix token (not twice)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=chunks.shape[1],
              add_bos_token=False)
    assert lm.prefix_token_id == tokenizer.bos_token_id == int(chunks[0, 0])
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(s,), idx=i)
            for i, s in enumerate(strings)]
    return math.exp(-sum(lm.loglikelihood_rolling(reqs, disable_tqdm=True)) / chunks[:, 1:].numel())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_perplexity_equals_lm_eval_rolling_loglikelihood(bos_tokenizer, bos_text_file, make_tiny, arch):
    """Independent check: our BOS-prefixed chunk perplexity = lm-eval's rolling log-likelihood on
    the same chunks (a tiny random model; dropping the first target of each chunk would move our
    number by 3e-3, 30× the tolerance)."""
    model = make_tiny(arch, len(bos_tokenizer), hidden=32, seed=1)
    chunks = eval_chunks(bos_tokenizer, bos_text_file, 24, max_chunks=6, bos="auto")
    ours = perplexity(model, chunks, batch_size=4, progress=False)
    assert ours == pytest.approx(lm_eval_rolling_ppl(model, bos_tokenizer, chunks), rel=1e-4)
    # and BOS matters: the same text scored without BOS gives another number
    never = perplexity(model, eval_chunks(bos_tokenizer, bos_text_file, 24, 6, bos="never"), progress=False)
    assert abs(never - ours) / ours > 1e-3


def test_gemma3_270m_dense_perplexity(capsys):
    """The packaged gemma-3-270m on 8 × 128 BoolQ tokens: 197.76 without BOS (the old
    number), 30.33 with BOS per chunk (= lm-eval's rolling log-likelihood; 27.68 when BOS is put
    before 128 text tokens and the first token of each chunk is not scored, the issue's protocol)."""
    import torch.nn.functional as F

    from sparsefw.models import load_model

    model, tok = load_model("gemma3-270m")
    assert bos_token_id(tok, "auto") == tok.bos_token_id == 2
    never = eval_chunks(tok, "boolq", 128, 8, bos="never")
    assert perplexity(model, never, progress=False) == pytest.approx(197.757, rel=1e-3)
    auto = eval_chunks(tok, "boolq", 128, 8, bos="auto")
    ppl = perplexity(model, auto, progress=False)
    assert ppl == pytest.approx(30.330, rel=1e-3)
    assert ppl == pytest.approx(lm_eval_rolling_ppl(model, tok, auto), rel=1e-4)
    x = torch.cat([torch.full((8, 1), 2), never], 1)      # the protocol: same 1,016 targets
    with torch.no_grad():
        lg = model(x, use_cache=False).logits[:, 1:-1]
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), x[:, 2:].reshape(-1))
    assert math.exp(float(nll)) == pytest.approx(27.684, rel=1e-3)
