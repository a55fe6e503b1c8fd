"""BOS handling (issue 12): calibration windows and perplexity chunks start with the tokenizer's BOS
when it adds one (Llama, Gemma), and the perplexity then equals lm-eval's rolling log-likelihood;
tokenizers without BOS (SmolLM2) get exactly the windows and chunks of earlier releases."""
import json
import math

import pytest
import torch

from conftest import tiny_model
from sparsefw import api
from sparsefw.calibration import bos_token_id, calibration_windows, eval_chunks, tokenize_text
from sparsefw.cli import main as cli_main
from sparsefw.errors import SparseFWError
from sparsefw.evaluate import perplexity

WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A word-level tokenizer that, like Llama's and Gemma's, puts <bos> before every text; decoding
    joins words with spaces, so decode -> encode gives back the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A 6,000-word text over the tokenizer's vocabulary with some structure (a random walk), so a
    tiny model's predictions are not all alike."""
    g = torch.Generator().manual_seed(1)
    steps = torch.randint(-3, 4, (6000,), generator=g).cumsum(0) % len(WORDS)
    p = tmp_path_factory.mktemp("text") / "walk.txt"
    p.write_text(" ".join(WORDS[i] for i in steps.tolist()))
    return str(p)


def test_bos_modes(bos_tokenizer, tokenizer):
    assert bos_token_id(bos_tokenizer, "auto") == 2
    assert bos_token_id(bos_tokenizer, "always") == 2
    assert bos_token_id(bos_tokenizer, "never") is None
    # SmolLM2's tokenizer has a BOS token (<|im_start|>) but does not add it: auto leaves it out
    assert tokenizer.bos_token_id is not None and tokenizer("hi")["input_ids"][0] != tokenizer.bos_token_id
    assert bos_token_id(tokenizer, "auto") is None
    assert bos_token_id(tokenizer, "always") == tokenizer.bos_token_id
    with pytest.raises(SparseFWError, match="BOS mode"):
        bos_token_id(tokenizer, "sometimes")


def test_calibration_windows_start_with_bos(bos_tokenizer, text_file):
    ids = tokenize_text(bos_tokenizer, open(text_file).read())
    assert ids[0] != 2                                     # the text stream itself has no BOS
    w = calibration_windows(bos_tokenizer, text_file, nsamples=8, seqlen=16, seed=3, bos="auto")
    assert w.shape == (8, 16) and (w[:, 0] == 2).all() and (w[:, 1:] != 2).all()
    # every window: BOS, then 15 consecutive tokens of the text, at the seed's random start
    starts = torch.randint(0, ids.numel() - 15, (8,), generator=torch.Generator().manual_seed(3))
    for row, s in zip(w, starts.tolist()):
        assert torch.equal(row[1:], ids[s:s + 15])
    never = calibration_windows(bos_tokenizer, text_file, nsamples=8, seqlen=16, seed=3, bos="never")
    assert never.shape == (8, 16) and (never != 2).all()
    with pytest.raises(SparseFWError, match="seqlen"):
        calibration_windows(bos_tokenizer, text_file, nsamples=2, seqlen=1, bos="auto")


def test_eval_chunks_with_bos(bos_tokenizer, text_file):
    ids = tokenize_text(bos_tokenizer, open(text_file).read())
    c = eval_chunks(bos_tokenizer, text_file, seqlen=10, max_chunks=5, bos="auto")
    assert c.shape == (5, 10) and (c[:, 0] == 2).all()
    assert torch.equal(c[:, 1:].reshape(-1), ids[:45])    # consecutive, non-overlapping, no token lost
    n = eval_chunks(bos_tokenizer, text_file, seqlen=10, max_chunks=5, bos="never")
    assert torch.equal(n.reshape(-1), ids[:50])


def test_smollm2_windows_and_chunks_unchanged(tokenizer, tmp_path):
    """No BOS for SmolLM2 under auto: windows and chunks equal the pre-issue formula (so every
    SmolLM2 number in the README stands)."""
    f = tmp_path / "text.txt"
    f.write_text("\n".join([open(__file__).read()] * 3))
    ids = tokenize_text(tokenizer, f.read_text())
    auto = calibration_windows(tokenizer, str(f), nsamples=6, seqlen=32, seed=0, bos="auto")
    starts = torch.randint(0, ids.numel() - 32, (6,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(auto, torch.stack([ids[s:s + 32] for s in starts.tolist()]))
    assert torch.equal(auto, calibration_windows(tokenizer, str(f), 6, 32, 0, bos="never"))
    assert torch.equal(eval_chunks(tokenizer, str(f), 32, 4, bos="auto"), ids[:128].view(4, 32))


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
def test_perplexity_equals_lm_eval_rolling_loglikelihood(bos_tokenizer, text_file, arch):
    """Independent check: our BOS-prefixed chunk perplexity = lm-eval's rolling log-likelihood on
    the same chunks (a tiny random model; dropping the first target of each chunk would move our
    number by 3e-3, 30× the tolerance)."""
    model = tiny_model(arch, len(bos_tokenizer), hidden=32, seed=1)
    chunks = eval_chunks(bos_tokenizer, text_file, 24, max_chunks=6, bos="auto")
    ours = perplexity(model, chunks, batch_size=4, progress=False)
    assert ours == pytest.approx(lm_eval_rolling_ppl(model, bos_tokenizer, chunks), rel=1e-4)
    # and BOS matters: the same text scored without BOS gives another number
    never = perplexity(model, eval_chunks(bos_tokenizer, text_file, 24, 6, bos="never"), progress=False)
    assert abs(never - ours) / ours > 1e-3


def test_gemma3_270m_dense_perplexity(capsys):
    """The packaged gemma-3-270m on 8 × 128 BoolQ tokens (issue 12): 197.76 without BOS (the old
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


def test_bos_in_report_and_cli(tmp_path, bos_tokenizer, text_file, capsys):
    m = tiny_model("llama", len(bos_tokenizer))
    src = tmp_path / "src"
    m.save_pretrained(src)
    bos_tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    assert cli_main(["prune", "--model", str(src), "--method", "wanda", "--calib", text_file,
                     "--nsamples", "3", "--seqlen", "16", "--output", str(out), "--eval-ppl",
                     "--ppl-source", text_file, "--ppl-chunks", "2"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["bos"] == "auto" and rep["bos_token"] == "<bos>" and rep["ppl"]["bos"] == "auto"
    assert rep["ppl"]["targets"] == 2 * 15 and rep["calibration_tokens"] == 3 * 16
    # auto and never are different dense perplexities: the dense-ppl cache keeps them apart
    dense_auto = rep["ppl"]["dense"]
    out2 = tmp_path / "out2"
    assert cli_main(["prune", "--model", str(src), "--method", "wanda", "--calib", text_file, "--bos", "never",
                     "--nsamples", "3", "--seqlen", "16", "--output", str(out2), "--eval-ppl",
                     "--ppl-source", text_file, "--ppl-chunks", "2"]) == 0
    rep2 = json.loads((out2 / "report.json").read_text())
    assert rep2["bos"] == "never" and rep2["bos_token"] is None and rep2["ppl"]["dense"] != dense_auto
    capsys.readouterr()
    assert cli_main(["prune", "--model", str(src), "--bos", "maybe", "--output", str(tmp_path / "x")]) == 2
    assert "BOS mode" in capsys.readouterr().err and not (tmp_path / "x").exists()
    res = api.eval_ppl(str(src), source=text_file, seqlen=16, chunks=2, bos="auto", progress=False)
    assert res["ppl"] == pytest.approx(dense_auto) and res["bos_token_id"] == 2
