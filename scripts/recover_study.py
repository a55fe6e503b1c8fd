"""Recovery study: prune, then distil the dense model into the pruned one with the mask kept
(`sparsefw recover`), and measure what it buys: perplexity against tokens seen, the three training
choices (all kept weights, norms + biases, masked LoRA) in the same budget, and zero-shot accuracy
before and after with paired per-document differences.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/recover_study.py --config configs/recover_smollm2.yaml
    .venv/bin/python scripts/recover_study.py --config configs/recover_smollm2.yaml --report-only

Resumable and shareable: every mask, run and zero-shot evaluation is claimed with a lock file, so two
single-thread workers on 2 cores can run the same config at once (start it twice); a finished run is
skipped and an interrupted one continues from its checkpoint. Writes OUT/masks/<mask>/ (pruned
checkpoints), OUT/runs/<run>/ (recovered checkpoints), OUT/cells/<run>.json (one result per run,
with the code version), OUT/zeroshot/<model>/ (per-document scores), and OUT/recover_study.{md,json,png}.

A mask is either prune options (``{method: sparsefw, sparsity: 0.6}``, with the shared ``prune:``
calibration options) or a saved cell of a results grid (``{cell: sparsefw+rec__0.6__s0}`` with
``grid: configs/results_smollm2.yaml``): then the grid's checkpoint is recovered (pruned again and
checked against its cell if missing) and its zero-shot scores before recovery are the grid's own.

The log-perplexity gap to dense is log(ppl / ppl_dense); "gap closed" is 1 - gap_after / gap_before.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


_GRIDS: dict[str, tuple] = {}


def grid_cell(c: dict, name: str) -> tuple[str, Path, str, dict] | None:
    """For a mask given as ``{cell: ID}``, a saved cell of the results grid ``c["grid"]`` (a
    ``sparsefw compare`` config): (grid config path, grid output folder, cell id, the cell's record);
    None for a mask given by prune options. Raises ValueError if there is no grid, or the cell is not
    finished or not saved by it."""
    spec = c["masks"][name]
    if "cell" not in spec:
        return None
    from sparsefw.compare import finished_cells

    if not c.get("grid"):
        raise ValueError(f"mask {name}: 'cell' needs 'grid:' (the results config the cell belongs to)")
    grid = str(ROOT / c["grid"]) if not Path(c["grid"]).is_absolute() else c["grid"]
    if grid not in _GRIDS:                 # read the grid's cell files once per process
        _GRIDS[grid] = finished_cells(grid, base=ROOT)
    g, gout, cells = _GRIDS[grid]
    cid = spec["cell"]
    if cells.get(cid) is None or cid not in set(g.get("save") or []):
        raise ValueError(f"mask {name}: {cid} is not a finished, saved cell of {c['grid']}; run it first "
                         f"(sparsefw compare --config {c['grid']}) or list it under 'save:'")
    return grid, gout, cid, cells[cid]


def ensure_mask(c: dict, out: Path, name: str) -> Path:
    """The pruned checkpoint of mask ``name``: a grid cell's saved checkpoint (pruned again and
    checked against the cell if missing, see zeroshot_paired.checkpoint), or pruned here with the
    mask's options unless another worker did it."""
    from sparsefw import api

    from zeroshot_paired import checkpoint, wait_or_claim

    if (gc := grid_cell(c, name)) is not None:
        return checkpoint(*gc)
    folder = out / "masks" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = wait_or_claim(folder / "report.json", out / "masks" / f"{name}.json", poll=20)
    if lock is not None:
        try:
            if not (folder / "report.json").exists():
                api.prune(c["model"], output=str(folder), overwrite=True, eval_ppl=False, **c.get("prune", {}),
                          **c["masks"][name])
        finally:
            lock.unlink(missing_ok=True)
    return folder


def dense_ppl(c: dict, out: Path) -> float:
    """The dense model's perplexity (computed once, kept in OUT/dense_ppl.json)."""
    from sparsefw import api
    from sparsefw.paths import write_atomic

    p, f = c["ppl"], out / "dense_ppl.json"
    if not f.exists():
        val = api.eval_ppl(c["model"], source=p["source"], seqlen=p["seqlen"], chunks=p["chunks"], progress=False)["ppl"]
        write_atomic(f, json.dumps({"ppl": val, **p}))
    return json.loads(f.read_text())["ppl"]


def run_cell(c: dict, out: Path, name: str) -> dict | None:
    """Recover run ``name`` and write its cell; None if another worker holds it."""
    from sparsefw import api
    from sparsefw.paths import claim
    from sparsefw.report import code_version

    cell = out / "cells" / f"{name}.json"
    if cell.exists():
        return json.loads(cell.read_text())
    cell.parent.mkdir(parents=True, exist_ok=True)
    lock = claim(cell)
    if lock is None:
        return None
    try:
        spec = dict(c["runs"][name])
        mask = ensure_mask(c, out, spec.pop("mask"))
        p = c["ppl"]
        folder = out / "runs" / name
        partial = folder.with_name(folder.name + ".partial")
        rep = api.recover(str(mask), c["model"], str(folder), overwrite=True, resume=partial.exists(),
                          eval_ppl=True, ppl_source=p["source"], ppl_seqlen=p["seqlen"], ppl_chunks=p["chunks"],
                          ppl_every=p.get("every", 0), **{**c["recover"], **spec}).report
        r, dense = rep["recovery"], dense_ppl(c, out)
        gap0, gap1 = math.log(r["ppl_before"] / dense), math.log(r["ppl_after"] / dense)
        gc = grid_cell(c, c["runs"][name]["mask"])
        prune = ({"grid": c["grid"], "cell": gc[2], **gc[3]["options"]} if gc else
                 {**c.get("prune", {}), **c["masks"][c["runs"][name]["mask"]]})
        res = {"run": name, "mask": c["runs"][name]["mask"], "prune": prune,
               "train": r["train"], "lr": r["lr"], "steps": r["steps"], "tokens": r["tokens"],
               "seconds": r["seconds"], "stopped_early": r["stopped_early"], "ppl_dense": dense,
               "ppl_before": r["ppl_before"], "ppl_after": r["ppl_after"], "log_gap_before": gap0,
               "log_gap_after": gap1, "gap_closed": 1 - gap1 / gap0 if gap0 > 0 else None,
               "curve": r["ppl_curve"], "losses": r["losses"], "achieved_sparsity": r["achieved_sparsity"],
               "code": code_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        cell.write_text(json.dumps(res, indent=1))
        return res
    finally:
        lock.unlink(missing_ok=True)


def before_scores(c: dict, out: Path, run: str) -> Path:
    """The folder of the per-document zero-shot shards of ``run``'s pruned model before recovery:
    a grid cell's own (``<grid output>/zeroshot/<cell>``, scored by zeroshot_paired.py, shared with
    the grid's table) or ``OUT/zeroshot/<run>_before``."""
    gc = grid_cell(c, c["runs"][run]["mask"])
    return gc[1] / "zeroshot" / gc[2] if gc else out / "zeroshot" / f"{run}_before"


def zeroshot(c: dict, out: Path) -> None:
    """7 tasks x the first ``limit`` documents for each listed run, before (its mask) and after,
    in shards of 100 documents (the grid's, so a grid cell's scores are shared), ``batch_size``
    documents' requests at a time (config ``zeroshot: {batch_size: ...}``, default 16; a model with
    a large vocabulary such as gemma-3's needs 4 to fit in 24 GiB)."""
    from zeroshot_paired import score, scored

    z = c.get("zeroshot") or {}
    limit = z.get("limit", 500)
    for run in z.get("runs", []):
        if not (out / "cells" / f"{run}.json").exists():
            continue
        for folder, model in ((before_scores(c, out, run), lambda: ensure_mask(c, out, c["runs"][run]["mask"])),
                              (out / "zeroshot" / f"{run}_after", lambda: out / "runs" / run)):
            if not scored(folder, limit):    # shards are claimed one at a time: workers share a model
                score(model(), folder, limit, z.get("batch_size", 16))


def report(c: dict, out: Path) -> str:
    """The Markdown table (and JSON, plot) of the finished cells."""
    cells = {n: json.loads((out / "cells" / f"{n}.json").read_text()) for n in c["runs"]
             if (out / "cells" / f"{n}.json").exists()}
    lines = [f"# Recovery study ({c['model']})", "",
             f"Perplexity: {c['ppl']['source']}, {c['ppl']['chunks']} x {c['ppl']['seqlen']} tokens. Budget per run: "
             + (f"{c['recover']['minutes']:g} minutes of training (evaluations excluded), 1 thread."
                if c["recover"].get("minutes") else f"{c['recover'].get('steps', 100)} steps."), "",
             "| run | mask | train | lr | tokens | minutes | ppl before | ppl after | dense | log-gap closed | code |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in cells.items():
        closed = "n/a (pruned not worse than dense)" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%"
        lines.append(f"| {n} | {r['mask']} | {r['train']} | {r['lr']:g} | {r['tokens']:,} | {r['seconds'] / 60:.1f} "
                     f"| {r['ppl_before']:.2f} | {r['ppl_after']:.2f} | {r['ppl_dense']:.2f} "
                     f"| {closed} | {r['code']} |")
    z = c.get("zeroshot") or {}
    from zeroshot_paired import build, scored

    limit = z.get("limit", 500)
    for r in z.get("runs", []):
        before, after = before_scores(c, out, r), out / "zeroshot" / f"{r}_after"
        if r in cells and scored(before, limit) and scored(after, limit):
            md, _ = build({"after": after, "before": before}, ["after"], ["before"], limit)
            lines += ["", f"## Zero-shot, {r}: after vs before recovery", "", md]
    text = "\n".join(lines) + "\n"
    (out / "recover_study.md").write_text(text)
    (out / "recover_study.json").write_text(json.dumps(cells, indent=1))
    if cells:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for n, r in cells.items():
            ax.plot([t for _, t, _ in r["curve"]], [p for _, _, p in r["curve"]], marker="o", ms=3, label=n)
        ax.axhline(next(iter(cells.values()))["ppl_dense"], color="k", ls="--", lw=1, label="dense")
        ax.set(xlabel="training tokens seen", ylabel="perplexity (log scale)", yscale="log",
               title="Recovery: perplexity against tokens")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "recover_study.png", dpi=120)
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--runs", default=None, help="comma-separated subset of the config's runs")
    ap.add_argument("--report-only", action="store_true", help="only write the table from finished cells")
    a = ap.parse_args(argv)
    c = yaml.safe_load(Path(a.config).read_text())
    out = Path(c["output"]) if Path(c["output"]).is_absolute() else ROOT / c["output"]
    out.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        for name in (a.runs.split(",") if a.runs else c["runs"]):
            run_cell(c, out, name)
            zeroshot(c, out)  # a finished run's before/after evaluations come before the next run
    print(report(c, out))


if __name__ == "__main__":
    main()
