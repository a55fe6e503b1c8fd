"""Methods × sparsities comparison on one model with one calibration set (experiment driver).

Reuses the single pipeline (:func:`sparsefw.api.prune`) for every cell, resumes from finished
cells (one JSON per cell under ``<output>/cells``), and writes ``comparison.json``,
``comparison.md`` (a Markdown table) and ``comparison.png`` (perplexity vs sparsity per method).
A cell counts as finished only if it holds the zero-shot result the config asks for (same tasks
and limit); the dense model's zero-shot result is ``cells/dense.json``. Several processes may run
the same config at once (e.g. two single-thread workers on 2 cores): each claims a cell with a
lock file (:func:`sparsefw.paths.claim`) and skips cells another live process holds.

Config (YAML)::

    model: smollm2-135m
    output: runs/compare_smollm2
    calib: wiki            # shared by every cell
    nsamples: 64
    seqlen: 512
    seed: 0
    bos: auto              # optional: BOS per calibration window and perplexity chunk
    ppl: {source: boolq, seqlen: 512, chunks: 64}
    validation: austen     # optional: a second held-out text (same seqlen/chunks) -> ppl_val per cell
    zeroshot: {tasks: [boolq, rte], limit: 100}      # optional
    sparsities: ["0.5", "0.6", "2:4"]
    methods:                                         # label -> PruneConfig fields
      magnitude: {method: magnitude}
      wanda: {method: wanda}
      sparsefw: {method: sparsefw, warmstart: wanda}
      sparsefw_fixrow: {method: sparsefw, fix: row, sparsities: ["2:4"]}   # only some columns
    save: [sparsefw]        # labels whose pruned checkpoints are saved (optional)
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm.auto import tqdm

from .config import load_yaml
from .errors import SparseFWError
from .paths import claim, write_atomic


def _cell_id(label: str, sp: str) -> str:
    return f"{label}__{sp.replace(':', 'of')}"


def _sp_args(sp: str) -> dict:
    sp = str(sp)
    if ":" in sp:
        return {"pattern": sp, "sparsity": None}
    try:
        return {"pattern": "unstructured", "sparsity": float(sp)}
    except ValueError:
        raise SparseFWError(f"sparsity entry '{sp}' must be a number like 0.5 or an N:M pattern like 2:4") from None


def load_config(path: str) -> dict:
    """Read and check a comparison config. Raises SparseFWError with what to fix."""
    c = load_yaml(path, required=("model", "methods", "sparsities"), example="configs/compare_smollm2.yaml")
    if not isinstance(c["methods"], dict) or not c["methods"]:
        raise SparseFWError("'methods' must map labels to options, e.g. {wanda: {method: wanda}}")
    return c


def _cells(c: dict) -> list[tuple[str, str, dict]]:
    """(label, sparsity, prune options) of every cell of config ``c``, each checked.
    Raises SparseFWError for bad options (before any cell runs)."""
    from .config import PruneConfig

    shared = {k: c[k] for k in ("calib", "nsamples", "seqlen", "seed", "bos", "device", "dtype") if k in c}
    cells = []
    for label, opts in c["methods"].items():
        opts = dict(opts or {})
        only = [str(x) for x in opts.pop("sparsities", c["sparsities"])]
        for sp in c["sparsities"]:
            if str(sp) not in only:
                continue
            kw = {**shared, **opts, **_sp_args(sp)}
            PruneConfig(**kw).validate()  # fail early on a typo
            cells.append((label, str(sp), kw))
    return cells


def _run_cell(c: dict, out: Path, label: str, sp: str, kw: dict, ppl: dict, zs, val, save: set) -> dict:
    """Prune and evaluate one cell; its JSON record."""
    from . import api

    t0 = time.perf_counter()
    cid = _cell_id(label, sp)
    rep = api.prune(c["model"], output=str(out / "models" / cid) if label in save else None,
                    overwrite=True, eval_ppl=True, ppl_source=ppl["source"], ppl_seqlen=int(ppl["seqlen"]),
                    ppl_chunks=ppl["chunks"], zeroshot=(zs or {}).get("tasks"),
                    zeroshot_limit=(zs or {}).get("limit"), progress=True, ppl_validation=val, **kw).report
    return {"label": label, "sparsity": sp, "method": kw.get("method"), "options": kw,
            "ppl": rep["ppl"]["pruned"], "ppl_dense": rep["ppl"]["dense"],
            "ppl_val": (rep.get("ppl_validation") or {}).get("pruned"),
            "ppl_val_dense": (rep.get("ppl_validation") or {}).get("dense"), "validation": val,
            "mean_error": rep["mean_error_final"], "mean_error_wanda": rep["mean_error_wanda"],
            "error_reduction_vs_wanda": rep["error_reduction_vs_wanda"],
            "achieved_sparsity": rep["achieved_sparsity"], "prune_seconds": rep["seconds"],
            "zeroshot_mean": (rep.get("zeroshot") or {}).get("mean_acc"),
            "zeroshot": rep.get("zeroshot"), "cell_seconds": time.perf_counter() - t0,
            "owl": rep.get("owl"), "timings": rep.get("timings"), "code": rep.get("code"),
            # per layer: [relative error of this cell, of Wanda's mask on the same inputs]
            "layer_errors": {L["name"]: [L["error_final"], L["error_wanda"]] for L in rep["layers"]}}


def _write_outputs(c: dict, out: Path, results: dict, dense: dict) -> dict:
    """comparison.json, comparison.md and comparison.png from the finished cells."""
    comp = {"config": c, "cells": results,
            "ppl_dense": next((r["ppl_dense"] for r in results.values()), None),
            "zeroshot_dense": dense.get("zeroshot")}
    _write_json(out / "comparison.json", json.loads(json.dumps(comp, default=str)))
    md = format_table(comp, [str(s) for s in c["sparsities"]], list(c["methods"]))
    write_atomic(out / "comparison.md", md)
    try:
        plot(comp, [str(s) for s in c["sparsities"]], list(c["methods"]), out / "comparison.png")
    except Exception as e:  # noqa: BLE001 - a missing display backend must not lose the results
        print(f"(plot skipped: {e})")
    print("\n" + md)
    print(f"wrote {out / 'comparison.md'}, comparison.json, comparison.png")
    return comp


def run_compare(config_path: str, output: str | None = None, report_only: bool = False) -> dict:
    """Run (or resume) every cell of a comparison config and write the table, JSON and plot.

    Args: config_path: YAML file (see module docstring). output: overrides the config's folder.
        report_only: prune nothing (not even the dense zero-shot cell); write the table, JSON and
            plot from the cells finished so far (to look at a long run while workers continue).
    Returns: the comparison dict written to ``comparison.json``.
    Raises: SparseFWError for a bad config or bad cell options (before any cell runs).
    """
    c = load_config(config_path)
    out = Path(output or c.get("output") or "runs/compare")
    (out / "cells").mkdir(parents=True, exist_ok=True)
    ppl = {"source": "boolq", "seqlen": int(c.get("seqlen", 512)), "chunks": 64, **(c.get("ppl") or {})}
    zs, val, save = c.get("zeroshot") or None, c.get("validation"), set(c.get("save") or [])
    cells = _cells(c)
    results = {}
    dense = _dense_cell(c["model"], out, None if report_only else zs)
    bar = tqdm(cells, desc="comparison", unit="cell")
    for label, sp, kw in bar:
        cid = _cell_id(label, sp)
        f = out / "cells" / f"{cid}.json"
        bar.set_postfix(cell=cid)
        done, lock = _finished(f, zs, val), None
        if not done and not report_only:
            lock = claim(f)  # None: another `sparsefw compare` process runs this cell
            done = lock and _finished(f, zs, val)  # it may have finished between the two looks
            if done:
                lock.unlink(missing_ok=True)
        if done:
            results[cid] = done
        if done or lock is None:
            continue
        results[cid] = _run_cell(c, out, label, sp, kw, ppl, zs, val, save)
        _write_json(f, results[cid])
        lock.unlink(missing_ok=True)
    for lab, sp, _ in cells:  # cells another process finished while this one ran
        cid = _cell_id(lab, sp)
        if cid not in results and (done := _finished(out / "cells" / f"{cid}.json", zs, val)):
            results[cid] = done
    missing = [_cell_id(lab, sp) for lab, sp, _ in cells if _cell_id(lab, sp) not in results]
    if missing and report_only:
        print(f"{len(missing)} of {len(cells)} cell(s) not finished yet: {', '.join(missing)}")
    elif missing:
        print(f"{len(missing)} cell(s) still running in another process: {', '.join(missing)}; "
              "run the command again when they finish to write the complete table")
    return _write_outputs(c, out, results, dense)


def _write_json(f: Path, obj: dict) -> None:
    """Write ``obj`` to ``f`` as indented JSON, atomically (:func:`sparsefw.paths.write_atomic`)."""
    write_atomic(f, json.dumps(obj, indent=1))


def _finished(f: Path, zs: dict | None, val: str | None = None) -> dict | None:
    """The finished cell stored in ``f``, or ``None`` if absent or lacking the asked zero-shot or
    validation perplexity."""
    if not f.exists():
        return None
    cell = json.loads(f.read_text())
    ok = _has_zeroshot(cell, zs) and (not val or cell.get("validation") == val)
    return cell if ok else None


def _has_zeroshot(cell: dict, zs: dict | None) -> bool:
    """True if ``cell`` holds the zero-shot result the config asks for (or none is asked for)."""
    if not zs:
        return True
    got = cell.get("zeroshot") or {}
    return (got.get("limit") == zs.get("limit")
            and set(got.get("tasks") or {}) >= set(zs.get("tasks") or []))


def _dense_cell(model: str, out: Path, zs: dict | None) -> dict:
    """The dense model's zero-shot result (``cells/dense.json``), computed once when asked for."""
    f = out / "cells" / "dense.json"
    cell = json.loads(f.read_text()) if f.exists() else {"label": "dense"}
    if zs and not _has_zeroshot(cell, zs):
        from . import api

        cell["zeroshot"] = api.eval_zeroshot(model, zs.get("tasks"), zs.get("limit"))
        cell["zeroshot_mean"] = cell["zeroshot"].get("mean_acc")
        _write_json(f, cell)
    return cell


def _sp_label(sp: str) -> str:
    """Column name of a sparsity: '0.5' -> '50%', N:M unchanged."""
    return sp if ":" in sp else f"{100 * float(sp):g}%"


def format_table(comp: dict, sparsities: list[str], labels: list[str]) -> str:
    """Markdown table: rows = methods, columns = perplexity per sparsity (+ zero-shot mean accuracy
    in %, layer error vs Wanda, mean pruning seconds); a cell not finished yet is left blank."""
    cells = comp["cells"]
    has_zs = any(v.get("zeroshot_mean") is not None for v in cells.values())
    names = [_sp_label(s) for s in sparsities]
    head = "| method | " + " | ".join(f"ppl {s}" for s in names)
    if has_zs:
        head += " | " + " | ".join(f"0-shot {s}" for s in names)
    head += " | " + " | ".join(f"err vs Wanda {s}" for s in names) + " | prune s (mean) |"
    ncol = head.count("|") - 1
    lines = [head, "|" + "---|" * ncol]
    if comp.get("ppl_dense"):
        zd = (comp.get("zeroshot_dense") or {}).get("mean_acc")
        lines.append("| dense | " + " | ".join(f"{comp['ppl_dense']:.2f}" for _ in sparsities)
                     + (" | " + " | ".join(f"{100 * zd:.2f}" if zd is not None else ""
                                           for _ in sparsities) if has_zs else "")
                     + " | " + " | ".join("" for _ in sparsities) + " | |")
    for lab in labels:
        row = [lab]
        got = [cells.get(_cell_id(lab, s)) for s in sparsities]
        row += [f"{g['ppl']:.2f}" if g else "" for g in got]
        if has_zs:
            row += [f"{100 * g['zeroshot_mean']:.2f}" if g and g.get("zeroshot_mean") is not None else "" for g in got]
        row += [f"{-100 * g['error_reduction_vs_wanda'] + 0.0:+.1f}%" if g else "" for g in got]  # no -0.0
        secs = [g["prune_seconds"] for g in got if g]
        row.append(f"{sum(secs) / len(secs):.0f}" if secs else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(comp: dict, sparsities: list[str], labels: list[str], path: Path) -> None:
    """Perplexity vs sparsity, one line per method (log scale; ``+rec`` variants dashed), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = list(range(len(sparsities)))
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours; the default cycle repeats after 10
    for i, lab in enumerate(labels):
        ys = [comp["cells"].get(_cell_id(lab, s), {}).get("ppl", math.nan) for s in sparsities]
        ax.plot(xs, ys, marker="o", color=colors[i % len(colors)], label=lab,
                ls="--" if lab.endswith("+rec") else "-")  # reconstructed variants dashed
    if comp.get("ppl_dense"):
        ax.axhline(comp["ppl_dense"], color="k", ls="--", lw=1, label="dense")
    ax.set_xticks(xs, sparsities)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("perplexity (log)")
    ax.set_yscale("log")
    ax.set_title(f"{comp['config'].get('model')}: perplexity vs sparsity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
