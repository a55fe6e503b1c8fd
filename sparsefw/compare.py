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
    save: [sparsefw, wanda__2of4]   # labels or cell ids whose pruned checkpoints are saved to
                                    # <output>/models/<cell id> (optional; e.g. for zero-shot later)
    isolate: true           # optional: every cell in a fresh process, so its peak RSS is its own

A label with ``seeds: [0, 1, 2]`` gets one cell per calibration seed (ids ``label__0.5__s1``);
the table shows their mean ± sample standard deviation. ``seed_sparsities: ["0.6"]`` (optional)
runs the extra seeds only at those sparsities (elsewhere only the first seed), to spend the
seeds where the spread is reported. Every cell records its wall time, the
peak RSS of the process that ran it (``peak_rss_scope``: ``cell`` when isolated, else
``process``, the worker's high-water mark so far) and the code version (:func:`sparsefw.report.code_version`).
One cell alone: ``sparsefw compare --config C --cell ID [--output DIR]``.
"""
from __future__ import annotations

import json
import math
import resource
import statistics
import time
from pathlib import Path

from tqdm.auto import tqdm

from .config import load_yaml
from .errors import SparseFWError
from .paths import claim, write_atomic


def _cell_id(label: str, sp: str, seed: int | None = None) -> str:
    return f"{label}__{sp.replace(':', 'of')}" + ("" if seed is None else f"__s{seed}")


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


def _seeds(label: str, opts: dict) -> list:
    """The calibration seeds of a label (``[None]``: the config's seed, one cell)."""
    seeds = opts.get("seeds")
    if seeds is None:
        return [None]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) for x in seeds):
        raise SparseFWError(f"method '{label}': seeds must be a list of integers, e.g. seeds: [0, 1, 2]")
    return seeds


def _cells(c: dict) -> list[tuple[str, str, str, dict]]:
    """(cell id, label, sparsity, prune options) of every cell of config ``c``, each checked.
    Raises SparseFWError for bad options (before any cell runs)."""
    from .config import PruneConfig

    shared = {k: c[k] for k in ("calib", "nsamples", "seqlen", "seed", "bos", "device", "dtype") if k in c}
    seeded = [str(x) for x in c.get("seed_sparsities", c["sparsities"])]
    cells = []
    for label, opts in c["methods"].items():
        opts = dict(opts or {})
        only = [str(x) for x in opts.pop("sparsities", c["sparsities"])]
        seeds = _seeds(label, opts)
        opts.pop("seeds", None)
        for sp in c["sparsities"]:
            if str(sp) not in only:
                continue
            for seed in seeds if str(sp) in seeded else seeds[:1]:
                kw = {**shared, **opts, **_sp_args(sp), **({} if seed is None else {"seed": seed})}
                PruneConfig(**kw).validate()  # fail early on a typo
                cells.append((_cell_id(label, str(sp), seed), label, str(sp), kw))
    return cells


def finished_cells(config_path: str, base: Path | None = None) -> tuple[dict, Path, dict[str, dict | None]]:
    """The finished cells of a comparison config, for scripts that read a grid without running it.

    Args: config_path: YAML file (see module docstring). base: folder a relative ``output`` is
        resolved against (default: the working directory).
    Returns: (config, output folder, {cell id: cell dict, or None if not finished}) with the ids in
        table order; a cell counts as finished as in :func:`run_compare` (it holds the zero-shot
        result and validation perplexity the config asks for).
    Raises: SparseFWError for a bad config or bad cell options."""
    c = load_config(config_path)
    out = Path(c.get("output") or "runs/compare")
    out = out if out.is_absolute() or base is None else Path(base) / out
    zs, val = c.get("zeroshot") or None, c.get("validation")
    return c, out, {cid: _finished(out / "cells" / f"{cid}.json", zs, val) for cid, *_ in _cells(c)}


def _run_isolated(*args) -> dict:
    """:func:`_run_cell` in a fresh (spawned) process, so that the peak RSS it records is the cell's."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(_run_cell, *args, isolated=True).result()


def _run_cell(c: dict, out: Path, cid: str, label: str, sp: str, kw: dict, ppl: dict, zs, val, save: set,
              isolated: bool = False) -> dict:
    """Prune and evaluate one cell; its JSON record."""
    from . import api

    t0 = time.perf_counter()
    rep = api.prune(c["model"], output=str(out / "models" / cid) if {label, cid} & save else None,
                    overwrite=True, eval_ppl=True, ppl_source=ppl["source"], ppl_seqlen=int(ppl["seqlen"]),
                    ppl_chunks=ppl["chunks"], zeroshot=(zs or {}).get("tasks"),
                    zeroshot_limit=(zs or {}).get("limit"), progress=True, ppl_validation=val, **kw).report
    return {"label": label, "sparsity": sp, "seed": kw.get("seed"), "method": kw.get("method"), "options": kw,
            "ppl": rep["ppl"]["pruned"], "ppl_dense": rep["ppl"]["dense"],
            "ppl_val": (rep.get("ppl_validation") or {}).get("pruned"),
            "ppl_val_dense": (rep.get("ppl_validation") or {}).get("dense"), "validation": val,
            "mean_error": rep["mean_error_final"], "mean_error_wanda": rep["mean_error_wanda"],
            "error_reduction_vs_wanda": rep["error_reduction_vs_wanda"],
            "achieved_sparsity": rep["achieved_sparsity"], "prune_seconds": rep["seconds"],
            "zeroshot_mean": (rep.get("zeroshot") or {}).get("mean_acc"),
            "zeroshot": rep.get("zeroshot"), "cell_seconds": time.perf_counter() - t0,
            "owl": rep.get("owl"), "timings": rep.get("timings"), "code": rep.get("code"),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,   # Linux: KiB
            "peak_rss_scope": "cell" if isolated else "process",
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


def run_compare(config_path: str, output: str | None = None, report_only: bool = False,
                only: list[str] | None = None) -> dict:
    """Run (or resume) every cell of a comparison config and write the table, JSON and plot.

    Args: config_path: YAML file (see module docstring). output: overrides the config's folder.
        report_only: prune nothing (not even the dense zero-shot cell); write the table, JSON and
            plot from the cells finished so far (to look at a long run while workers continue).
        only: cell ids to run (e.g. ``["sparsefw__0.6__s1"]``, to reproduce one cell); the others
            are neither run nor shown.
    Returns: the comparison dict written to ``comparison.json``.
    Raises: SparseFWError for a bad config, bad cell options or an unknown cell id (before any
        cell runs).
    """
    c = load_config(config_path)
    out = Path(output or c.get("output") or "runs/compare")
    ppl = {"source": "boolq", "seqlen": int(c.get("seqlen", 512)), "chunks": 64, **(c.get("ppl") or {})}
    zs, val, save = c.get("zeroshot") or None, c.get("validation"), set(c.get("save") or [])
    cells = _cells(c)
    if unknown := sorted(map(str, save - {x for cid, label, *_ in cells for x in (cid, label)})):
        raise SparseFWError(f"save: {', '.join(unknown)} is neither a method label nor a cell id of this "
                            "config (cell ids look like wanda__0.5 or wanda__2of4__s1)")
    if only:
        unknown = sorted(set(only) - {cid for cid, *_ in cells})
        if unknown:
            raise SparseFWError(f"unknown cell id(s) {', '.join(unknown)}; this config's cells are: "
                                + ", ".join(cid for cid, *_ in cells))
        cells = [x for x in cells if x[0] in only]
    (out / "cells").mkdir(parents=True, exist_ok=True)
    run = _run_isolated if c.get("isolate") else _run_cell
    results = {}
    dense = _dense_cell(c["model"], out, None if report_only else zs)
    bar = tqdm(cells, desc="comparison", unit="cell")
    for cid, label, sp, kw in bar:
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
        results[cid] = run(c, out, cid, label, sp, kw, ppl, zs, val, save)
        _write_json(f, results[cid])
        lock.unlink(missing_ok=True)
    for cid, *_ in cells:  # cells another process finished while this one ran
        if cid not in results and (done := _finished(out / "cells" / f"{cid}.json", zs, val)):
            results[cid] = done
    missing = [cid for cid, *_ in cells if cid not in results]
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


def _group(comp: dict, label: str, sp: str) -> list[dict]:
    """The finished cells of ``label`` at sparsity ``sp``: one per seed of the label."""
    seeds = ((comp["config"].get("methods") or {}).get(label) or {}).get("seeds") or [None]
    return [g for x in seeds if (g := comp["cells"].get(_cell_id(label, sp, x)))]


def _mean_std(vals: list, spec: str, scale: float = 1.0, sign: bool = False) -> str:
    """``mean`` of the values (times ``scale``), ``mean ± sample std`` for two or more; "" for none."""
    vals = [scale * v for v in vals if v is not None]
    if not vals:
        return ""
    text = f"{statistics.fmean(vals) + 0.0:{'+' if sign else ''}{spec}}"      # + 0.0: no -0.0
    return text + (f" ± {statistics.stdev(vals):{spec}}" if len(vals) > 1 else "")


def format_table(comp: dict, sparsities: list[str], labels: list[str]) -> str:
    """Markdown table: rows = methods, columns = perplexity per sparsity (+ zero-shot mean accuracy
    in %, layer error vs Wanda, mean pruning seconds, and the largest per-cell peak RSS when the
    cells ran isolated); a label with several seeds shows mean ± sample std; a cell not finished
    yet is left blank."""
    cells = comp["cells"]
    has_zs = any(v.get("zeroshot_mean") is not None for v in cells.values())
    has_rss = any(v.get("peak_rss_scope") == "cell" for v in cells.values())
    names = [_sp_label(s) for s in sparsities]
    head = "| method | " + " | ".join(f"ppl {s}" for s in names)
    if has_zs:
        head += " | " + " | ".join(f"0-shot {s}" for s in names)
    head += " | " + " | ".join(f"err vs Wanda {s}" for s in names) + " | prune s (mean) |"
    head += " peak RSS GiB |" if has_rss else ""
    ncol = head.count("|") - 1
    lines = [head, "|" + "---|" * ncol]
    if comp.get("ppl_dense"):
        zd = (comp.get("zeroshot_dense") or {}).get("mean_acc")
        lines.append("| dense | " + " | ".join(f"{comp['ppl_dense']:.2f}" for _ in sparsities)
                     + (" | " + " | ".join(f"{100 * zd:.2f}" if zd is not None else ""
                                           for _ in sparsities) if has_zs else "")
                     + " | " + " | ".join("" for _ in sparsities) + " | |" + (" |" if has_rss else ""))
    for lab in labels:
        groups = [_group(comp, lab, s) for s in sparsities]
        n = max(len(g) for g in groups) if groups else 0
        row = [lab + (f" ({n} seeds)" if n > 1 else "")]
        row += [_mean_std([g["ppl"] for g in gs], ".2f") for gs in groups]
        if has_zs:
            row += [_mean_std([g.get("zeroshot_mean") for g in gs], ".2f", 100.0) for gs in groups]
        row += [_mean_std([g["error_reduction_vs_wanda"] for g in gs], ".1f", -100.0, sign=True) + ("%" if gs else "")
                for gs in groups]
        every = [g for gs in groups for g in gs]
        row.append(f"{statistics.fmean(g['prune_seconds'] for g in every):.0f}" if every else "")
        if has_rss:
            rss = [g["peak_rss_gib"] for g in every if g.get("peak_rss_scope") == "cell"]
            row.append(f"{max(rss):.2f}" if rss else "")
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
        ys = [statistics.fmean(g["ppl"] for g in gs) if (gs := _group(comp, lab, s)) else math.nan
              for s in sparsities]
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
