"""A setting chosen on validation text: the table of a comparison whose cells hold a validation
perplexity (``validation:`` in the config), e.g. the alpha study and the FW-iterations study.

Reads the cells of ``sparsefw compare`` under FOLDER and writes ``validation_table.md`` /
``validation_table.json`` next to them:

1. per setting (seed 0; a setting is the method with its alpha and FW iterations): validation
   perplexity (Austen) and test perplexity (BoolQ) at every sparsity, the layer error vs Wanda,
   the mean prune seconds, and the geometric mean of the validation perplexities, by which the
   settings are ranked (lowest first);
2. per (setting, sparsity) with several calibration seeds: mean ± sample std (n − 1) of the test
   and validation perplexities.

    python scripts/validation_table.py results/alpha_smollm2
    python scripts/validation_table.py results/iterations_smollm2
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def sp_label(s: str) -> str:
    """Column name of a sparsity: '0.6' -> '60%', N:M unchanged."""
    return s if ":" in s else f"{100 * float(s):g}%"


def _key(cell: dict) -> str:
    """The setting of a cell: ``swaps`` (no FW iteration; cells from when ``sparsefw`` ran
    ``iterations 0`` count as that), or ``sparsefw α A, N iterations``."""
    from sparsefw.methods import DEFAULT_ITERATIONS

    # cells without a code version predate the 10-iteration default: then sparsefw alone ran no FW iteration
    o = {"iterations": DEFAULT_ITERATIONS if cell.get("code") else 0, **cell["options"]}
    if o.get("method") == "swaps" or not int(o["iterations"]):
        return "swaps (no FW iteration)"
    return f"sparsefw α {o.get('alpha', 0.9):g}, {int(o['iterations'])} iterations" + \
        (", no swaps" if int(o.get("swaps", 50)) == 0 else "")


def build(folder: Path) -> tuple[str, dict]:
    cells = [json.loads(f.read_text()) for f in sorted((folder / "cells").glob("*.json"))
             if f.name != "dense.json"]
    cells = [c for c in cells if c.get("ppl_val") is not None]
    sps = list(dict.fromkeys(c["sparsity"] for c in cells))
    seed0 = defaultdict(dict)
    by_seed = defaultdict(list)
    for c in cells:
        by_seed[(_key(c), c["sparsity"])].append(c)
        if int(c["options"].get("seed", 0)) == 0:
            seed0[_key(c)][c["sparsity"]] = c
    rank = {k: math.exp(statistics.fmean(math.log(v[s]["ppl_val"]) for s in sps))
            for k, v in seed0.items() if all(s in v for s in sps)}
    order = sorted(rank, key=rank.get)
    dense = cells[0]
    lines = [f"Dense: validation (Austen) {dense['ppl_val_dense']:.2f}, test (BoolQ) {dense['ppl_dense']:.2f}.", "",
             "| setting | " + " | ".join(f"val {sp_label(s)}" for s in sps) + " | val geo-mean | "
             + " | ".join(f"test {sp_label(s)}" for s in sps) + " | "
             + " | ".join(f"err vs Wanda {sp_label(s)}" for s in sps) + " | prune s (mean) |",
             "|---" * (1 + 3 * len(sps) + 2) + "|"]
    for k in order:
        v = seed0[k]
        lines.append(f"| {k} | " + " | ".join(f"{v[s]['ppl_val']:.2f}" for s in sps) + f" | {rank[k]:.2f} | "
                     + " | ".join(f"{v[s]['ppl']:.2f}" for s in sps) + " | "
                     + " | ".join(f"{-100 * v[s]['error_reduction_vs_wanda']:+.1f}%" for s in sps)
                     + f" | {statistics.fmean(v[s]['prune_seconds'] for s in sps):.0f} |")
    spread = {}
    for (k, s), cs in sorted(by_seed.items()):
        if len(cs) < 2:
            continue
        t = [c["ppl"] for c in cs]
        va = [c["ppl_val"] for c in cs]
        spread[f"{k} @ {sp_label(s)}"] = {"seeds": sorted(int(c["options"].get("seed", 0)) for c in cs),
                                    "test_mean": statistics.fmean(t), "test_std": statistics.stdev(t),
                                    "val_mean": statistics.fmean(va), "val_std": statistics.stdev(va)}
    if spread:
        lines += ["", "| setting (calibration seeds) | test ppl mean ± std | validation ppl mean ± std |",
                  "|---|---|---|"]
        for name, r in spread.items():
            lines.append(f"| {name} ({', '.join(map(str, r['seeds']))}) | {r['test_mean']:.2f} ± {r['test_std']:.2f} "
                         f"| {r['val_mean']:.2f} ± {r['val_std']:.2f} |")
    out = {"ranking_by_validation_geomean": [(k, rank[k]) for k in order], "seed0": {
        k: {s: {m: c[m] for m in ("ppl", "ppl_val", "error_reduction_vs_wanda", "prune_seconds")}
            for s, c in v.items()} for k, v in seed0.items()}, "seed_spread": spread}
    return "\n".join(lines) + "\n", out


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/validation_table.py RESULTS_FOLDER (e.g. results/iterations_smollm2)")
    folder = Path(sys.argv[1])
    md, out = build(folder)
    (folder / "validation_table.md").write_text(md)
    (folder / "validation_table.json").write_text(json.dumps(out, indent=1))
    print(md)


if __name__ == "__main__":
    main()
