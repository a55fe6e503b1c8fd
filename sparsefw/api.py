"""Python API with the CLI's verbs, for notebooks and scripts:

>>> from sparsefw import api
>>> res = api.prune("smollm2-135m", method="sparsefw", sparsity=0.5, nsamples=64, seqlen=512,
...                 output="out/smollm2-50", eval_ppl=True)
>>> res.report["ppl"]
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .calibration import bos_token_id
from .errors import SparseFWError
from .evaluate import eval_ppl as _eval_ppl
from .models import PACKAGED, decoder_blocks, load_model, resolve_device, resolve_model
from .distributed import Ranks, barrier, broadcast_object, init_ranks
from .onload import placed_for_eval
from .paths import cache_dir, write_atomic
from .pipeline import PruneConfig, check_prunable, prune_model
from .saving import check_output_dir, save_pruned


@dataclass
class PruneResult:
    """What :func:`prune` returns: the pruned model (in memory), its tokenizer and the report."""

    model: object
    tokenizer: object
    report: dict


def _ppl_cache_key(model_name: str, source: str, seqlen: int, chunks, bos: str, model=None) -> str | None:
    src = Path(resolve_model(model_name)) if model_name in PACKAGED else Path(model_name)
    cfg = src / "config.json"
    if not cfg.exists():
        return None
    stamp = f"{src.resolve()}|{cfg.stat().st_mtime_ns}|{source}|{seqlen}|{chunks}|bos={bos}"
    if model is not None:
        w = model.get_input_embeddings().weight
        if w.dtype != torch.float32 or w.device.type != "cpu":   # float32 CPU keys stay as they were
            stamp += f"|{w.dtype}|{w.device.type}"
    return hashlib.sha1(stamp.encode()).hexdigest()


def dense_ppl(model_name: str, model, tokenizer, source: str, seqlen: int, chunks, progress=True,
              bos: str = "auto", ranks: Ranks | None = None) -> dict:
    """Perplexity of the unpruned model, cached on disk per (model folder, text, seqlen, chunks,
    BOS mode, dtype and device type) so sweeps evaluate the dense model once. Same return value as
    :func:`sparsefw.evaluate.eval_ppl`. With several processes the main one reads and writes the
    cache and the others follow its decision."""
    ranks = ranks or Ranks()
    key = _ppl_cache_key(model_name, source, seqlen, chunks, bos, model)
    store = cache_dir() / "dense_ppl.json"
    table = json.loads(store.read_text()) if store.exists() and ranks.is_main else {}
    hit = broadcast_object(table.get(key) if key else None, 0, ranks)
    if hit is not None:
        return hit
    res = _eval_ppl(model, tokenizer, source, seqlen, chunks, progress=progress, bos=bos, ranks=ranks)
    if key and ranks.is_main:
        table = json.loads(store.read_text()) if store.exists() else {}
        table[key] = res
        write_atomic(store, json.dumps(table, indent=1))
    return res


def prune(model: str, output: str | None = None, overwrite: bool = False, eval_ppl: bool = False,
          ppl_source: str = "boolq", ppl_seqlen: int | None = None, ppl_chunks: int | None = 64,
          zeroshot: list[str] | None = None, zeroshot_limit: int | None = None, progress: bool = True,
          stream: bool = False, max_shard_size: str | int = "5GB", push_to_hub: str | None = None,
          private: bool = False, ppl_validation: str | None = None, **config) -> PruneResult:
    """Load, prune (sequential layerwise), optionally evaluate and save a causal LM.

    Args:
        model: packaged short name (``smollm2-135m``, ``gemma3-270m``), local folder or hub id.
        output: folder for the pruned checkpoint + report.json + README.md (None = don't save).
        overwrite: allow a non-empty output folder.
        eval_ppl: evaluate dense and pruned perplexity on ``ppl_source`` (default the BoolQ
            Wikipedia passages, never the calibration text) in ``ppl_chunks`` non-overlapping
            chunks of ``ppl_seqlen`` tokens (default: the calibration seqlen).
        ppl_validation: a second held-out text (e.g. ``austen``), evaluated like ``ppl_source``
            (dense and pruned, same seqlen and chunks) into ``report["ppl_validation"]``: for
            choosing hyper-parameters on text that is neither calibration nor test (optional).
        zeroshot: lm-eval task names to evaluate the pruned model on (optional).
        stream: never hold the whole checkpoint in memory: read each block from the safetensors
            when it is reached and write it to ``output`` (:mod:`sparsefw.streaming`); needs
            ``output``; evaluate the saved checkpoint afterwards. ``model`` of the result is None.
        max_shard_size: transformers' shard limit for the saved safetensors (``"5GB"``).
        push_to_hub: ``USER/NAME``: upload ``output`` to the Hugging Face Hub afterwards
            (:func:`sparsefw.publish.push`; ``private`` repo if asked). The token and the Hub are
            checked before pruning starts; a failed upload keeps the local output.
        **config: fields of :class:`sparsefw.pipeline.PruneConfig` (method, sparsity, pattern,
            warmstart, alpha, fix, iterations, step, tol, reconstruct, calib, nsamples, seqlen, seed,
            bos, device, dtype, owl, owl_m, owl_lambda, true_sequential). ``bos`` (``auto`` default, ``always``, ``never``) applies to the
            calibration windows and the perplexity chunks alike; ``device`` (``auto`` = CUDA when
            present) and ``dtype`` (``auto`` = the checkpoint's) to pruning and evaluation. The
            checkpoint is saved in the dtype it was loaded with.
    Returns: :class:`PruneResult`.
    Raises: SparseFWError for any bad input, before anything is written.
    """
    known = {f.name for f in fields(PruneConfig)}
    unknown = set(config) - known
    if unknown:
        raise SparseFWError(f"unknown option(s) {sorted(unknown)}; valid: {sorted(known)}")
    cfg = PruneConfig(**config)
    pattern = cfg.validate()
    if output is not None:
        check_output_dir(output, overwrite)
    if push_to_hub:
        from .publish import check_hub_access

        if output is None:
            raise SparseFWError("--push-to-hub uploads the saved checkpoint: give --output too")
        check_hub_access(push_to_hub)
        res = prune(model, output=output, overwrite=overwrite, eval_ppl=eval_ppl, ppl_source=ppl_source,
                    ppl_seqlen=ppl_seqlen, ppl_chunks=ppl_chunks, zeroshot=zeroshot,
                    zeroshot_limit=zeroshot_limit, progress=progress, stream=stream,
                    max_shard_size=max_shard_size, ppl_validation=ppl_validation, **config)
        if int(os.environ.get("RANK", "0")) == 0:
            from .publish import push

            res.report["pushed"] = push(output, push_to_hub, private=private)
        return res
    if stream:
        if output is None:
            raise SparseFWError("--stream writes each pruned block as it goes: give --output")
        if eval_ppl or zeroshot or ppl_validation:
            raise SparseFWError("--stream does not evaluate (the model is never whole in memory); "
                                "evaluate the saved checkpoint afterwards with sparsefw eval-ppl")
        from .streaming import stream_prune

        report = stream_prune(model, output, cfg, overwrite=overwrite, progress=progress)
        return PruneResult(None, None, report)
    t0 = time.perf_counter()
    ranks = init_ranks(cfg.device)
    device = ranks.device
    progress = progress and ranks.is_main
    mdl, tok = load_model(model, dtype=cfg.dtype, device="cpu")   # blocks are onloaded one at a time
    names = check_prunable(mdl, pattern)
    report = {"model": model, **cfg.report_fields()}
    report["device"] = str(device)
    report["dtype"] = str(mdl.get_input_embeddings().weight.dtype).replace("torch.", "")
    block_class = type(decoder_blocks(mdl)[0]).__name__
    bos_id = bos_token_id(tok, cfg.bos)
    report["bos_token"] = None if bos_id is None else tok.convert_ids_to_tokens(bos_id)
    pseq = int(ppl_seqlen or cfg.seqlen)
    # report key -> text: the test perplexity and, optionally, the validation text's
    texts = {**({"ppl": ppl_source} if eval_ppl else {}),
             **({"ppl_validation": ppl_validation} if ppl_validation else {})}
    dense = {}
    if texts:
        with placed_for_eval(mdl, device, block_class):
            for key, src in texts.items():
                dense[key] = dense_ppl(model, mdl, tok, src, pseq, ppl_chunks, progress=progress, bos=cfg.bos,
                                       ranks=ranks)
    res = prune_model(mdl, tok, cfg, progress=progress, ranks=ranks)
    mdl.to("cpu")
    report["seconds"] = res.pop("seconds")
    report.update(res)
    if texts:
        with placed_for_eval(mdl, device, block_class):
            for key, src in texts.items():
                p = _eval_ppl(mdl, tok, src, pseq, ppl_chunks, progress=progress, bos=cfg.bos, ranks=ranks)
                report[key] = {"dense": dense[key]["ppl"], "pruned": p["ppl"], "source": src, "seqlen": pseq,
                               "chunks": p["chunks"], "tokens": p["tokens"], "targets": p["targets"],
                               "bos": cfg.bos}
    if zeroshot:   # the main process scores, the others wait
        from .zeroshot import evaluate_zeroshot

        if ranks.is_main:
            with placed_for_eval(mdl, device, block_class):
                report["zeroshot"] = evaluate_zeroshot(mdl, tok, tasks=zeroshot, limit=zeroshot_limit)
        report["zeroshot"] = broadcast_object(report.get("zeroshot"), 0, ranks)
    report["total_seconds"] = time.perf_counter() - t0
    # reorder so the summary comes first and the per-layer list last
    layers = report.pop("layers")
    report["layers"] = layers
    if output is not None and ranks.is_main:
        save_pruned(mdl, tok, output, report, [f"{n}.weight" for n in names], overwrite=overwrite,
                    max_shard_size=max_shard_size)
    else:  # not saved (or not by this process): count on the in-memory tensors
        zeros = total = 0
        sd = mdl.state_dict()
        for n in names:
            t = sd[f"{n}.weight"]
            zeros += int((t == 0).sum())
            total += t.numel()
        report.update({"zeros": zeros, "total": total, "achieved_sparsity": zeros / max(total, 1)})
    barrier(ranks)   # every process returns after the checkpoint is written
    return PruneResult(mdl, tok, report)


def eval_ppl(model: str, source: str = "boolq", seqlen: int = 512, chunks: int | None = 64,
             progress: bool = True, bos: str = "auto", device: str = "auto", dtype: str = "auto") -> dict:
    """Perplexity of a saved (or packaged / hub) model on held-out text; see
    :func:`sparsefw.evaluate.eval_ppl` (``bos``: auto | always | never; ``device``, ``dtype`` as in
    :func:`sparsefw.models.load_model`). Raises SparseFWError for unknown models, texts, BOS modes,
    dtypes, or an unavailable device."""
    mdl, tok = load_model(model, dtype=dtype, device="cpu")
    with placed_for_eval(mdl, resolve_device(device), type(decoder_blocks(mdl)[0]).__name__):
        out = _eval_ppl(mdl, tok, source, seqlen, chunks, progress=progress, bos=bos)
    out["model"] = model
    return out


def eval_zeroshot(model: str, tasks=None, limit: int | None = None, batch_size: int = 8,
                  resume_dir: str | None = None, shard_size: int = 1000) -> dict:
    """Zero-shot accuracy with lm-eval (offline task data when the hub is unreachable).

    ``model`` is anything :func:`load_model` takes (packaged name, directory, hub id); the other
    arguments and the returned dict are those of :func:`sparsefw.zeroshot.evaluate_zeroshot`
    (``resume_dir``: score in shards of ``shard_size`` documents and resume from finished shards).
    Raises SparseFWError (unknown model or task, bad limit / batch size / shard size).
    """
    from .zeroshot import STANDARD_TASKS, evaluate_zeroshot

    mdl, tok = load_model(model)
    return evaluate_zeroshot(mdl, tok, tasks=tasks or STANDARD_TASKS, limit=limit,
                             batch_size=batch_size, resume_dir=resume_dir, shard_size=shard_size)
