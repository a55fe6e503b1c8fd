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
from dataclasses import dataclass
from pathlib import Path

import torch

from .calibration import bos_token_id
from .errors import SparseFWError
from .evaluate import eval_ppl as _eval_ppl
from .models import PACKAGED, decoder_blocks, load_model, resolve_device, resolve_model
from .distributed import Ranks, barrier, broadcast_object, init_ranks
from .onload import placed_for_eval
from .paths import cache_dir, write_atomic
from .config import PruneConfig
from .experts import saved_tensor_names, split_tensor_name, tensor_name
from .pipeline import check_prunable, prune_model
from .report import run_report
from .resume import run_state
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


def _evaluate(mdl, tok, texts: dict, dense: dict, pseq: int, chunks, cfg, device, block_class, ranks,
              progress: bool) -> dict:
    """Perplexity of the pruned model on each text of ``texts`` (report key -> text), beside the
    dense model's (``dense``, same keys): the report entries."""
    out = {}
    with placed_for_eval(mdl, device, block_class):
        for key, src in texts.items():
            p = _eval_ppl(mdl, tok, src, pseq, chunks, progress=progress, bos=cfg.bos, ranks=ranks)
            out[key] = {"dense": dense[key]["ppl"], "pruned": p["ppl"], "source": src, "seqlen": pseq,
                        "chunks": p["chunks"], "tokens": p["tokens"], "targets": p["targets"], "bos": cfg.bos}
    return out


def _zeroshot(mdl, tok, tasks, limit, device, block_class, ranks) -> dict | None:
    """lm-eval zero-shot results of the pruned model (the main process scores, the others wait)."""
    from .zeroshot import evaluate_zeroshot

    res = None
    if ranks.is_main:
        with placed_for_eval(mdl, device, block_class):
            res = evaluate_zeroshot(mdl, tok, tasks=tasks, limit=limit)
    return broadcast_object(res, 0, ranks)


def _count_zeros(mdl, names: list[str]) -> dict:
    """Zeros among the pruned weights, counted on the in-memory tensors."""
    sd = mdl.state_dict()
    ts = []
    for n in names:
        key, e = split_tensor_name(tensor_name(n))
        ts.append(sd[key] if e is None else sd[key][e])
    zeros = sum(int((t == 0).sum()) for t in ts)
    total = sum(t.numel() for t in ts)
    return {"zeros": zeros, "total": total, "achieved_sparsity": zeros / max(total, 1)}


def _prune_in_memory(model: str, cfg: PruneConfig, pattern, output, overwrite, eval_ppl, ppl_source, ppl_seqlen,
                     ppl_chunks, zeroshot, zeroshot_limit, progress, max_shard_size, ppl_validation,
                     resume) -> PruneResult:
    """:func:`prune` without streaming or upload (arguments as there; ``cfg`` validated)."""
    t0 = time.perf_counter()
    ranks = init_ranks(cfg.device)
    device, progress = ranks.device, progress and ranks.is_main
    state = run_state(model, cfg, output, ranks, resume, overwrite)
    mdl, tok = load_model(model, dtype=cfg.dtype, device="cpu")   # blocks are onloaded one at a time
    names = check_prunable(mdl, pattern, cfg.skip_unknown)
    block_class = type(decoder_blocks(mdl)[0]).__name__
    bos_id = bos_token_id(tok, cfg.bos)
    pseq = int(ppl_seqlen or cfg.seqlen)
    # report key -> text: the test perplexity and, optionally, the validation text's
    texts = {**({"ppl": ppl_source} if eval_ppl else {}),
             **({"ppl_validation": ppl_validation} if ppl_validation else {})}
    dense = {}
    if texts:
        with placed_for_eval(mdl, device, block_class):
            dense = {key: dense_ppl(model, mdl, tok, src, pseq, ppl_chunks, progress=progress, bos=cfg.bos,
                                    ranks=ranks) for key, src in texts.items()}
    res = prune_model(mdl, tok, cfg, progress=progress, ranks=ranks, pattern=pattern, state=state)
    if res["dropped_experts"]:     # the layers left after --drop-experts
        names = check_prunable(mdl, pattern, cfg.skip_unknown)
    mdl.to("cpu")
    extra = {"bos_token": None if bos_id is None else tok.convert_ids_to_tokens(bos_id)}
    extra.update(_evaluate(mdl, tok, texts, dense, pseq, ppl_chunks, cfg, device, block_class, ranks, progress))
    if zeroshot:
        extra["zeroshot"] = _zeroshot(mdl, tok, zeroshot, zeroshot_limit, device, block_class, ranks)
    report = run_report(model, cfg, device, mdl.get_input_embeddings().weight.dtype, res, t0, **extra)
    if output is not None and ranks.is_main:
        save_pruned(mdl, tok, output, report, saved_tensor_names(mdl, names), overwrite=overwrite,
                    max_shard_size=max_shard_size)
    else:  # not saved (or not by this process): count on the in-memory tensors
        report.update(_count_zeros(mdl, names))
    barrier(ranks)   # every process returns after the checkpoint is written
    if state is not None:
        state.remove()
    return PruneResult(mdl, tok, report)


def prune(model: str, output: str | None = None, overwrite: bool = False, eval_ppl: bool = False,
          ppl_source: str = "boolq", ppl_seqlen: int | None = None, ppl_chunks: int | None = 64,
          zeroshot: list[str] | None = None, zeroshot_limit: int | None = None, progress: bool = True,
          stream: bool = False, max_shard_size: str | int = "5GB", push_to_hub: str | None = None,
          private: bool = False, ppl_validation: str | None = None, resume: bool = False,
          **config) -> PruneResult:
    """Load, prune (sequential layerwise), optionally evaluate and save a causal LM.

    Args:
        model: packaged short name (``smollm2-135m``, ``gemma3-270m``), local folder or hub id.
        output: folder for the pruned checkpoint + report.json + README.md (None = don't save).
        overwrite: allow a non-empty output folder.
        eval_ppl: dense and pruned perplexity on ``ppl_source`` (default the BoolQ Wikipedia
            passages, never the calibration text) in ``ppl_chunks`` chunks of ``ppl_seqlen``
            tokens (default: the calibration seqlen).
        ppl_validation: a second held-out text (e.g. ``austen``) evaluated the same way into
            ``report["ppl_validation"]``, for choosing settings on text that is not the test text.
        zeroshot: lm-eval task names to evaluate the pruned model on (optional).
        stream: never hold the whole checkpoint in memory (:mod:`sparsefw.streaming`); needs
            ``output``; evaluate the saved checkpoint afterwards. ``model`` of the result is None.
        max_shard_size: transformers' shard limit for the saved safetensors (``"5GB"``).
        push_to_hub: ``USER/NAME``: upload ``output`` afterwards (:func:`sparsefw.publish.push`;
            ``private`` repo if asked); token and Hub are checked before pruning starts.
        resume: continue a run with the same settings and ``output`` that was interrupted
            (:mod:`sparsefw.resume`: its finished blocks are loaded, not pruned again).
        **config: :class:`sparsefw.config.PruneConfig` settings and the method's options (e.g.
            ``method="sparsefw", sparsity=0.6, alpha=0.9, iterations=30``).
    Returns: :class:`PruneResult`.
    Raises: SparseFWError for any bad input, before anything is written.
    """
    cfg = PruneConfig(**config)
    pattern = cfg.validate()
    if output is not None:
        check_output_dir(output, overwrite)
    if push_to_hub:
        from .publish import check_hub_access, push

        if output is None:
            raise SparseFWError("--push-to-hub uploads the saved checkpoint: give --output too")
        check_hub_access(push_to_hub)
        res = prune(model, output=output, overwrite=overwrite, eval_ppl=eval_ppl, ppl_source=ppl_source,
                    ppl_seqlen=ppl_seqlen, ppl_chunks=ppl_chunks, zeroshot=zeroshot,
                    zeroshot_limit=zeroshot_limit, progress=progress, stream=stream,
                    max_shard_size=max_shard_size, ppl_validation=ppl_validation, resume=resume, **config)
        if int(os.environ.get("RANK", "0")) == 0:
            res.report["pushed"] = push(output, push_to_hub, private=private)
        return res
    if stream:
        if output is None:
            raise SparseFWError("--stream writes each pruned block as it goes: give --output")
        if eval_ppl or zeroshot or ppl_validation:
            raise SparseFWError("--stream does not evaluate (the model is never whole in memory); "
                                "evaluate the saved checkpoint afterwards with sparsefw eval-ppl")
        from .streaming import stream_prune

        return PruneResult(None, None, stream_prune(model, output, cfg, overwrite=overwrite, progress=progress,
                                                    pattern=pattern, resume=resume))
    return _prune_in_memory(model, cfg, pattern, output, overwrite, eval_ppl, ppl_source, ppl_seqlen, ppl_chunks,
                            zeroshot, zeroshot_limit, progress, max_shard_size, ppl_validation, resume)


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


def _save_recovered(student, tok, names, model, teacher, output, overwrite, cfg, rec, ppl, ppl_source) -> dict:
    """Write the recovered checkpoint (in the pruned checkpoint's dtype), report.json (the prune
    report with ``recovery``) and the model card atomically into ``output``; returns the report."""
    from transformers import AutoConfig

    from .inspection import inspect_checkpoint
    from .saving import staged_output

    src = Path(resolve_model(model))
    report = json.loads((src / "report.json").read_text()) if (src / "report.json").is_file() else {"model": model}
    report["recovery"] = {**rec, "teacher": teacher, **ppl, "ppl_source": ppl_source}

    saved = getattr(AutoConfig.from_pretrained(str(src)), "dtype", None) if src.is_dir() else None
    saved = getattr(torch, saved) if isinstance(saved, str) else saved
    student.to("cpu")
    if saved in (torch.bfloat16, torch.float16):     # saved in the pruned checkpoint's dtype (zeros stay zero)
        student.to(saved)
    with staged_output(output, overwrite) as tmp:
        student.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        info = inspect_checkpoint(tmp, names=saved_tensor_names(student, names))
        report["recovery"]["achieved_sparsity"] = info["sparsity"]
        write_atomic(tmp / "report.json", json.dumps(report, indent=2, default=str))
        card = (src / "README.md").read_text() if (src / "README.md").is_file() else f"# {model}\n"
        last = rec["losses"][-1][1] if rec["losses"] else float("nan")
        card += (f"\n## Recovery\n\nDistilled from `{teacher}` with the mask kept: {rec['steps']} steps, "
                 f"{rec['tokens']:,} tokens of `{cfg.calib}`"
                 + (f" (stopped at the {cfg.minutes:g}-minute budget)" if rec["stopped_early"] else "")
                 + f", train `{cfg.train}`" + (f" (rank {cfg.lora_rank})" if cfg.train == "lora" else "")
                 + f", final loss {last:.4f}, "
                 f"sparsity {info['sparsity']:.4f}"
                 + (f", perplexity ({ppl_source}) {ppl['ppl_before']:.3f} -> {ppl['ppl_after']:.3f}" if ppl else "")
                 + ".\n")
        write_atomic(tmp / "README.md", card)
    return report


def recover(model: str, teacher: str, output: str, overwrite: bool = False, resume: bool = False,
            eval_ppl: bool = False, ppl_source: str = "boolq", ppl_seqlen: int = 512, ppl_chunks: int | None = 64,
            ppl_every: int = 0, progress: bool = True, **config) -> PruneResult:
    """Recover a pruned checkpoint by mask-preserving distillation from its dense model
    (:mod:`sparsefw.recover`) and save it with its report.

    Args:
        model: the pruned checkpoint (folder or hub id). teacher: the dense model it was pruned from.
        output: folder for the recovered checkpoint (in the pruned checkpoint's dtype; training runs
            in float32), report.json (the prune report, if the pruned folder has one, with
            ``recovery`` added) and README.md. overwrite: replace a non-empty ``output``.
        resume: continue from ``<output>.partial`` (progress saved every ``checkpoint_every`` steps).
        eval_ppl: the student's perplexity on ``ppl_source`` before and after (``ppl_chunks`` x
            ``ppl_seqlen`` tokens) in ``report["recovery"]["ppl_before" / "ppl_after"]``; with
            ``ppl_every`` > 0 also every ``ppl_every`` steps, as ``ppl_curve`` [(step, tokens, ppl)].
        **config: :class:`sparsefw.recover.RecoverConfig` settings (steps, lr, train, ...).
    Returns: :class:`PruneResult` (the recovered model, tokenizer, report).
    Raises: SparseFWError for bad settings, an unusable output folder, a teacher whose vocabulary
        differs, or a student that is not sparse; nothing is written then.
    """
    import shutil

    from .masks import parse_pattern
    from .recover import RecoverConfig, recover_model, resumed_curve, save_curve
    from .resume import partial_dir

    unknown = sorted(set(config) - set(RecoverConfig.__dataclass_fields__))
    if unknown:
        raise SparseFWError(f"unknown recover option(s) {unknown}; valid: {sorted(RecoverConfig.__dataclass_fields__)}")
    cfg = RecoverConfig(**config)
    cfg.validate()
    check_output_dir(output, overwrite)
    state = partial_dir(output)
    if state.exists() and not (resume or overwrite):
        raise SparseFWError(f"'{state}' holds an interrupted recovery: continue it with --resume, or start over "
                            "with --overwrite")
    ranks = init_ranks(cfg.device)
    device, progress = ranks.device, progress and ranks.is_main
    if overwrite and not resume and state.exists() and ranks.is_main:
        shutil.rmtree(state)
    barrier(ranks)
    student, tok = load_model(model, dtype="float32", device=device)
    dense, ttok = load_model(teacher, dtype="float32", device=device)
    names = check_prunable(student, parse_pattern("unstructured", 0.5))
    ppl = {}
    if eval_ppl:
        ppl["ppl_before"] = _eval_ppl(student, tok, ppl_source, ppl_seqlen, ppl_chunks, progress=progress,
                                      ranks=ranks)["ppl"]
    curve = resumed_curve(state) if resume else []

    def point(step, mdl):            # the perplexity curve against tokens seen (kept across --resume)
        if eval_ppl and ppl_every > 0 and step % ppl_every == 0 and step < cfg.steps:
            p = _eval_ppl(mdl, tok, ppl_source, ppl_seqlen, ppl_chunks, progress=False, ranks=ranks)["ppl"]
            curve.append((step, step * cfg.tokens_per_step, p))
            if ranks.is_main:
                save_curve(state, curve)
    rec = recover_model(student, dense, tok, ttok, cfg, names, state_dir=state, progress=progress, ranks=ranks,
                        on_step=point)
    if eval_ppl:
        ppl["ppl_after"] = _eval_ppl(student, tok, ppl_source, ppl_seqlen, ppl_chunks, progress=progress,
                                     ranks=ranks)["ppl"]
        ppl["ppl_curve"] = [(0, 0, ppl["ppl_before"]), *curve, (rec["steps"], rec["tokens"], ppl["ppl_after"])]
    if not ranks.is_main:                            # the main process writes the output and the report
        return PruneResult(student, tok, broadcast_object(None, 0, ranks))
    report = _save_recovered(student, tok, names, model, teacher, output, overwrite, cfg, rec, ppl,
                             ppl_source if eval_ppl else None)
    if state.exists():
        shutil.rmtree(state)
    return PruneResult(student, tok, broadcast_object(report, 0, ranks))
