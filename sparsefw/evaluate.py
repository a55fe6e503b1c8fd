"""Perplexity of a causal LM on held-out text (plumbing)."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibration import bos_token_id, eval_chunks
from .distributed import all_sum, window_range
from .errors import SparseFWError


MAX_LOGITS = 2 ** 27  # logits per forward pass (512 MiB in float32)


@torch.no_grad()
def perplexity(model, chunks: torch.Tensor, batch_size: int = 4, progress: bool = True, ranks=None) -> float:
    """Perplexity exp(mean token NLL) over non-overlapping chunks (Wanda/SparseGPT protocol:
    every chunk is scored independently; the first token of each chunk has no prediction).

    Args:
        model: a causal LM (any dtype and device; the loss is computed in float32).
        chunks: (n_chunks, seqlen) int64 token ids (moved to the model's device).
        batch_size: chunks per forward pass, at most; lowered so that one forward's logits hold at
            most :data:`MAX_LOGITS` floats (gemma-3's 262k vocabulary: 1 chunk of 512, where 4
            chunks took 38 s instead of 4 × 5.4 s on one CPU thread, in the cross-entropy
            over 2 GB of logits).
        ranks: with several processes (:class:`sparsefw.distributed.Ranks`), each scores a
            contiguous share of the chunks and the sums are all-reduced.
    Returns: perplexity (float, >= 1), the same on every rank.
    Raises: SparseFWError if the loss is NaN/Inf (a broken model).
    """
    model.eval()
    dev = model.get_input_embeddings().weight.device
    vocab = model.get_output_embeddings().weight.shape[0]
    batch_size = max(1, min(int(batch_size), MAX_LOGITS // (chunks.shape[1] * vocab)))
    if ranks is not None and ranks.world > 1:
        chunks = chunks[list(window_range(chunks.shape[0], ranks))]
        progress = progress and ranks.is_main
    nll, count = 0.0, 0
    for i in tqdm(range(0, chunks.shape[0], batch_size), desc="perplexity", unit="batch", disable=not progress):
        x = chunks[i:i + batch_size].to(dev)
        logits = model(x, use_cache=False).logits[:, :-1].float()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
    if ranks is not None:
        nll, count = all_sum([nll, float(count)], ranks)
    ppl = math.exp(nll / count)
    if not math.isfinite(ppl):
        raise SparseFWError("perplexity is not finite: the model produces NaN/Inf logits")
    return ppl


def eval_ppl(model, tokenizer, source: str = "boolq", seqlen: int = 512, max_chunks: int | None = 64,
             batch_size: int = 4, progress: bool = True, bos: str = "auto", ranks=None) -> dict:
    """Perplexity on a named held-out text (default: the BoolQ Wikipedia passages, offline).

    ``bos`` (``auto`` | ``always`` | ``never``) decides whether every chunk starts with the
    tokenizer's BOS token (:func:`sparsefw.calibration.eval_chunks`); ``auto`` does so exactly
    when the tokenizer adds BOS by default (Llama, Gemma), which lm-eval's rolling
    log-likelihood also does. ``ranks``: several processes share the chunks (:func:`perplexity`).

    Returns: {"ppl", "source", "seqlen", "chunks", "tokens", "targets", "bos", "bos_token_id",
    "seconds"}: tokens = chunks × seqlen (BOS included), targets = predicted tokens.
    Raises SparseFWError as :func:`sparsefw.calibration.eval_chunks` and :func:`perplexity`.
    """
    t0 = time.perf_counter()
    chunks = eval_chunks(tokenizer, source, seqlen, max_chunks, bos=bos)
    ppl = perplexity(model, chunks, batch_size=batch_size, progress=progress, ranks=ranks)
    return {"ppl": ppl, "source": source, "seqlen": seqlen, "chunks": int(chunks.shape[0]),
            "tokens": int(chunks.numel()), "targets": int(chunks[:, 1:].numel()), "bos": bos,
            "bos_token_id": bos_token_id(tokenizer, bos), "seconds": time.perf_counter() - t0}
