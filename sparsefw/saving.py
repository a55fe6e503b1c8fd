"""Atomic saving of pruned checkpoints with report.json and a model card (plumbing; the card
itself is built by :mod:`sparsefw.publish`)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import SparseFWError


def check_output_dir(output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check, before any work, that ``output`` can be written.

    Args: output: target folder; overwrite: allow replacing a non-empty folder.
    Returns: the resolved Path.
    Raises: SparseFWError if it is a file, non-empty without ``overwrite``, or its parent is not
        writable.
    """
    out = Path(output).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise SparseFWError(f"output '{out}' is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SparseFWError(f"output folder '{out}' is not empty; choose a new folder or pass --overwrite")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SparseFWError(f"cannot write to '{parent}' (permission denied); choose a writable --output")
    return out


def model_card(report: dict) -> str:
    """The model card (README.md text) of a pruned checkpoint: :func:`sparsefw.publish.build_model_card`
    (huggingface_hub ``ModelCard`` with hub metadata; the checkpoint summary from ``report``)."""
    from .publish import build_model_card

    return str(build_model_card(report))


@contextlib.contextmanager
def staged_output(output: str | os.PathLike, overwrite: bool = False):
    """Write a checkpoint folder atomically: the body fills a temporary folder beside ``output``
    (yielded), which is renamed into place when the body succeeds and deleted when it raises, so
    a crash never leaves a half-written checkpoint.

    Raises: SparseFWError as :func:`check_output_dir`.
    """
    out = check_output_dir(output, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_report(folder: Path, report: dict, pruned_tensors: list[str]) -> dict:
    """Count the achieved sparsity on the saved tensors, in one read of the files
    (:func:`sparsefw.inspection.inspect_checkpoint`: ``zeros``, ``total``, ``achieved_sparsity``
    and, under ``"checkpoint"``, files, size, dtypes and the N:M check), add the source model's hub
    id and license (:func:`sparsefw.publish.source_info`, under ``"source"``), then write
    ``report.json`` and the model card ``README.md`` into ``folder``. Returns the report.

    Raises: SparseFWError if a pruned tensor is missing from the saved files.
    """
    from .inspection import inspect_checkpoint, inspection_summary
    from .publish import source_info
    from .report import layers_last

    pat = str(report.get("pattern"))
    info = inspect_checkpoint(folder, pattern=pat if ":" in pat else None, names=pruned_tensors)
    report.update(zeros=info["zeros"], total=info["total"], achieved_sparsity=info["sparsity"],
                  checkpoint=inspection_summary(info))
    if "source" not in report:
        report["source"] = source_info(str(report.get("model")))
    layers_last(report)
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (folder / "README.md").write_text(model_card(report))
    return report


def save_pruned(model, tokenizer, output: str | os.PathLike, report: dict, pruned_tensors: list[str],
                overwrite: bool = False, max_shard_size: str | int = "5GB") -> dict:
    """Save model (safetensors), tokenizer, report.json and README.md atomically
    (:func:`staged_output`). ``achieved_sparsity`` is counted on the saved tensors and added to
    the report.

    Args:
        model, tokenizer: what to save. output: target folder. report: JSON-able dict (updated in
        place). pruned_tensors: state-dict names of the pruned weights. overwrite: replace a
        non-empty folder. max_shard_size: transformers' shard limit (``"5GB"``, the Hub's
        convention; a model larger than that is split into ``model-0000N-of-0000M.safetensors``
        with an index). The tensors keep the dtype the model was loaded with.
    Returns: the report.
    Raises: SparseFWError as :func:`check_output_dir`.
    """
    with staged_output(output, overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        write_report(tmp, report, pruned_tensors)
    return report
