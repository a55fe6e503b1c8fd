"""Regenerate every results number in README.md and docs/results.md from the result cells.

The generated parts of those pages sit between ``<!-- generated: NAME -->`` and
``<!-- /generated: NAME -->`` lines; everything else is hand-written. NAME is one of:

- ``headline``: README's table, test perplexity of the headline methods on both models (mean ±
  sample std over the calibration seeds where a label has several);
- ``table:STEM``: the full table of ``configs/STEM.yaml`` (:func:`sparsefw.compare.format_table`),
  with the code version and how many of its cells are finished;
- ``claims``: the paper's claims (scripts/results_claims.py) over the results configs;
- ``zeroshot:STEM``: the zero-shot tables of scripts/zeroshot_paired.py --config (``zeroshot.md``
  in the config's output folder);
- ``alpha:STEM``: the validation-text ranking of scripts/validation_table.py for that config's folder;
- ``recovery:STEM``: the recovery table of scripts/recover_study.py (``recover_study.md``).

``--check`` writes nothing and exits 1 if a generated part differs from what the cells give now,
if an image the pages show is missing, or if a cell of a shown config is missing or was made by other code than the current
(scripts/check_results_current.py): the pages then do not describe the code a user installs.

    .venv/bin/python scripts/results_docs.py            # rewrite the generated parts
    .venv/bin/python scripts/results_docs.py --check    # are the pages current?
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/results.md")
HEADLINE_CONFIGS = ("results_smollm2", "results_gemma3")
HEADLINE = {"wanda": "Wanda", "ria": "RIA", "sparsegpt": "SparseGPT",
            "sparsefw_swaps0": "`sparsefw --swaps 0` (the paper's algorithm)",
            "sparsefw": "`sparsefw` (default: + exact swaps)", "sparsefw+rec": "`sparsefw --reconstruct`"}
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
MARK = re.compile(r"(<!-- generated: (\S+) -->\n)(.*?)(<!-- /generated: \2 -->)", re.S)


@functools.cache
def _script(name: str):
    """scripts/<name>.py as a module (the scripts are plain files, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _config(stem: str) -> str:
    return str(ROOT / "configs" / f"{stem}.yaml")


def _sp(sp: str) -> str:
    return _script("validation_table").sp_label(sp)


def _progress(done: int, total: int) -> str:
    """"" when all ``total`` cells are finished, else a line saying how many are."""
    return "" if done == total else f"{done} of {total} cells finished; the others are still running.\n"


def _finished(stem: str) -> tuple[dict, Path, dict, int]:
    """(config, output folder, {cell id: finished cell}, number of cells asked for) of configs/<stem>.yaml."""
    return _script("results_claims").finished(_config(stem), base=ROOT)


def _ppl(cells: dict, label: str, sp: str, key: str = "ppl") -> str:
    """Mean perplexity (``key``: ``ppl`` test, ``ppl_val`` validation) of a label at a sparsity over
    its seeds, ``± std`` for several; "" if none."""
    got = [c[key] for c in cells.values() if c["label"] == label and str(c["sparsity"]) == sp
           and c.get(key) is not None]
    if not got:
        return ""
    return f"{statistics.fmean(got):.2f}" + (f" ± {statistics.stdev(got):.2f}" if len(got) > 1 else "")


def headline() -> str:
    """README's table: rows = headline methods, columns = model × sparsity (test perplexity)."""
    cols, dense, done, total = [], [], 0, 0
    for stem in HEADLINE_CONFIGS:
        c, _, cells, n = _finished(stem)
        done, total = done + len(cells), total + n
        cols += [(c["model"], str(sp), cells) for sp in c["sparsities"]]
        d = next((x["ppl_dense"] for x in cells.values()), None)
        dense += [d] * len(c["sparsities"])
    lines = ["| method | " + " | ".join(f"{m} {_sp(sp)}" for m, sp, _ in cols) + " |",
             "|---" * (len(cols) + 1) + "|",
             "| dense | " + " | ".join("" if d is None else f"{d:.2f}" for d in dense) + " |"]
    for label, name in HEADLINE.items():
        lines.append(f"| {name} | " + " | ".join(_ppl(cells, label, sp) for _, sp, cells in cols) + " |")
    more = _progress(done, total)
    return "\n".join(lines) + "\n" + (f"\n{more}" if more else "")


def table(stem: str) -> str:
    """The full comparison table of one config, with its code version and progress."""
    from sparsefw.compare import format_table

    c, _, cells, total = _finished(stem)
    codes = sorted({str(v.get("code")) for v in cells.values()})
    comp = {"config": c, "cells": cells, "ppl_dense": next((v["ppl_dense"] for v in cells.values()), None)}
    head = (f"`configs/{stem}.yaml`: {len(cells)} of {total} cells, code "
            f"{', '.join(codes) or '-'}.\n\n")
    sps = [str(s) for s in c["sparsities"]]
    text = head + format_table(comp, sps, list(c["methods"]))
    if c.get("validation"):
        dense = next((v["ppl_val_dense"] for v in cells.values() if v.get("ppl_val_dense")), None)
        text += (f"\nValidation perplexity ({c['validation']}, the same chunks for every cell):\n\n| method | "
                 + " | ".join(_sp(sp) for sp in sps) + " |\n" + "|---" * (len(sps) + 1) + "|\n"
                 + ("" if dense is None else "| dense | " + " | ".join(f"{dense:.2f}" for _ in sps) + " |\n")
                 + "".join(f"| {lab} | " + " | ".join(_ppl(cells, lab, sp, "ppl_val") for sp in sps) + " |\n"
                           for lab in c["methods"]))
    return text


def _recovery(stem: str) -> tuple[Path, list[str]]:
    """(output folder, run names) of a recovery config (scripts/recover_study.py's format)."""
    import yaml

    c = yaml.safe_load((ROOT / "configs" / f"{stem}.yaml").read_text())
    out = Path(c["output"])
    return (out if out.is_absolute() else ROOT / out), list(c["runs"])


def _recovery_problems(stem: str, current: str) -> list[str]:
    """``missing RUN`` / ``stale RUN (code X)`` for the runs of a recovery config."""
    import json

    out, runs = _recovery(stem)
    bad = []
    for run in runs:
        f = out / "cells" / f"{run}.json"
        code = json.loads(f.read_text()).get("code") if f.exists() else None
        bad += [] if code == current else [f"missing {run}" if code is None else f"stale {run} (code {code})"]
    return bad


def section(name: str) -> str:
    """The Markdown of one generated part. Raises ValueError for an unknown name."""
    kind, _, stem = name.partition(":")
    if kind == "headline":
        return headline()
    if kind == "table":
        return table(stem)
    if kind == "claims":
        claims = _script("results_claims")
        configs = [_config(s) for s in HEADLINE_CONFIGS]
        return claims.build(configs, claims.DEFAULT_OURS.split(","))[0] + "\n"
    if kind == "zeroshot":
        f = _finished(stem)[1] / "zeroshot.md"
        return f.read_text() if f.exists() else "(not measured yet)\n"
    if kind == "recovery":    # scripts/recover_study.py's table, without its page title
        f = _recovery(stem)[0] / "recover_study.md"
        return f.read_text().split("\n", 2)[2] if f.exists() else "(not measured yet)\n"
    if kind == "alpha":
        _, out, cells, total = _finished(stem)
        if not cells:
            return "(not measured yet)\n"
        more = _progress(len(cells), total)
        return (f"{more}\n" if more else "") + _script("validation_table").build(out)[0]
    raise ValueError(f"unknown generated part '{name}'")


def regenerate(text: str) -> str:
    """``text`` with every generated part replaced by its current Markdown."""
    return MARK.sub(lambda m: m.group(1) + section(m.group(2)) + m.group(4), text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page or a cell is not current")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    bad = []
    stems, recovery = set(), set()
    for page in PAGES:
        p = ROOT / page
        old = p.read_text()
        for m in MARK.finditer(old):
            kind, _, stem = m.group(2).partition(":")
            if stem:
                (recovery if kind == "recovery" else stems).add(stem)
        bad += [f"{page}: image {src} is missing (scripts/results.sh draws it)" for src in IMAGE.findall(old)
                if not (p.parent / src).exists()]
        new = regenerate(old)
        if new != old:
            bad.append(f"{page}: generated parts differ from the cells")
            if not a.check:
                p.write_text(new)
                print(f"wrote {page}")
    if a.check:
        from sparsefw.report import code_version

        current = code_version()
        for stem in sorted(stems | set(HEADLINE_CONFIGS)):
            bad += [f"{stem}: {x}" for x in _script("check_results_current").check(_config(stem), current, ROOT)]
        for stem in sorted(recovery):
            bad += [f"{stem}: {x}" for x in _recovery_problems(stem, current)]
        print("\n".join(bad) or "all generated parts and their cells are current")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
