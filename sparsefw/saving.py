"""Atomic saving of pruned checkpoints with report.json and a model card (plumbing)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import safe_open

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


def count_sparsity(folder: str | os.PathLike, tensor_names: list[str]) -> dict:
    """Count zeros of the given tensors in the saved safetensors files.

    Args: folder with ``*.safetensors``; tensor_names: state-dict names (e.g. ``...q_proj.weight``).
    Returns: {"zeros": int, "total": int, "achieved_sparsity": zeros / total}.
    Raises: SparseFWError if a tensor is missing from the files.
    """
    want = set(tensor_names)
    zeros = total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if k in want:
                    t = fh.get_tensor(k)
                    zeros += int((t == 0).sum())
                    total += t.numel()
                    want.discard(k)
    if want:
        raise SparseFWError(f"{len(want)} pruned tensors are missing from the saved files, e.g. {sorted(want)[0]}")
    return {"zeros": zeros, "total": total, "achieved_sparsity": zeros / max(total, 1)}


def model_card(report: dict) -> str:
    """A Hugging Face model card (README.md) for a pruned checkpoint, from its report."""
    ppl = report.get("ppl") or {}
    pat = report.get("pattern")
    sp = report.get("sparsity")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [pruned, sparse, sparsefw, frank-wolfe]",
        f"base_model: {report.get('base_model_hub') or report.get('model')}",
        "---",
        "",
        f"# {Path(str(report.get('model'))).name} pruned with SparseFW ({report.get('method')}, "
        f"{pat if pat and ':' in str(pat) else f'{float(sp):.0%} {pat}'})",
        "",
        "Pruned post-training with [SparseFW](https://arxiv.org/abs/2510.13713) (Frank-Wolfe over the "
        "convex hull of sparse masks, layer by layer on calibration text). Zeros are stored densely; "
        "load with `AutoModelForCausalLM.from_pretrained`.",
        "",
        "| setting | value |", "|---|---|",
    ]
    for k in ("method", "warmstart", "alpha", "pattern", "sparsity", "achieved_sparsity", "calib",
              "nsamples", "seqlen", "seed", "reconstruct", "seconds"):
        if k in report:
            v = report[k]
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    if ppl:
        lines += ["", f"Perplexity ({ppl.get('source', '')}, {ppl.get('chunks', '?')} chunks of "
                      f"{ppl.get('seqlen', '?')} tokens): dense {ppl.get('dense', float('nan')):.3f}, "
                      f"pruned {ppl.get('pruned', float('nan')):.3f}."]
    if report.get("zeroshot"):
        lines += ["", f"Zero-shot mean accuracy: {report['zeroshot'].get('mean_acc', float('nan')):.4f}."]
    lines += ["", "See `report.json` for per-layer errors.", ""]
    return "\n".join(lines)


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
    """Count the achieved sparsity on the saved tensors (added to ``report``), then write
    ``report.json`` and the model card ``README.md`` into ``folder``. Returns the report."""
    report.update(count_sparsity(folder, pruned_tensors))
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (folder / "README.md").write_text(model_card(report))
    return report


def save_pruned(model, tokenizer, output: str | os.PathLike, report: dict, pruned_tensors: list[str],
                overwrite: bool = False) -> dict:
    """Save model (safetensors), tokenizer, report.json and README.md atomically
    (:func:`staged_output`). ``achieved_sparsity`` is counted on the saved tensors and added to
    the report.

    Args:
        model, tokenizer: what to save. output: target folder. report: JSON-able dict (updated in
        place). pruned_tensors: state-dict names of the pruned weights. overwrite: replace a
        non-empty folder.
    Returns: the report.
    Raises: SparseFWError as :func:`check_output_dir`.
    """
    with staged_output(output, overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_report(tmp, report, pruned_tensors)
    return report
