"""Per-layer error reduction vs Wanda of SparseFW and SparseFW + reconstruction.

Reads the per-layer errors that every comparison cell keeps (``layer_errors``: layer name ->
[relative error of the cell's method, relative error of the Wanda mask on the same inputs]) and
plots 1 - error / error_wanda by depth, one panel per sparsity, coloured by layer type; prints the
maximum, median and minimum reduction per cell and writes them as JSON next to the figure.

    python scripts/plot_layer_errors.py results/owl_smollm2 --labels sparsefw,sparsefw+rec \\
        --sparsities 0.5,0.6,2:4
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def reductions(cell: dict) -> list[tuple[int, str, float]]:
    """(block index, layer type, 1 - error / error_wanda) for every layer of a cell."""
    out = []
    for name, (err, wanda) in cell["layer_errors"].items():
        m = re.search(r"\.(\d+)\.", name)
        out.append((int(m.group(1)) if m else -1, name.split(".")[-1], 1.0 - err / wanda if wanda > 0 else 0.0))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a comparison output folder (with cells/)")
    ap.add_argument("--labels", default="sparsefw,sparsefw+rec")
    ap.add_argument("--sparsities", default="0.5,0.6,2:4")
    ap.add_argument("--out", default=None, help="figure path (default: FOLDER/per_layer_error.png)")
    a = ap.parse_args()
    folder = Path(a.folder)
    labels, sps = a.labels.split(","), a.sparsities.split(",")
    stats, data = {}, {}
    for sp in sps:
        for lab in labels:
            f = folder / "cells" / f"{lab}__{sp.replace(':', 'of')}.json"
            if not f.exists():   # a label with calibration seeds: its seed-0 cell
                f = f.with_name(f"{f.stem}__s0.json")
            if not f.exists():
                print(f"missing {f}")
                continue
            r = reductions(json.loads(f.read_text()))
            data[(sp, lab)] = r
            v = sorted(x[2] for x in r)
            by_type = {t: statistics.median([x[2] for x in r if x[1] == t]) for t in TYPES if any(x[1] == t for x in r)}
            stats[f"{lab} {sp}"] = {"max": v[-1], "median": statistics.median(v), "min": v[0], "layers": len(v),
                                    "median_by_type": by_type}
            print(f"{lab:14s} {sp:4s} reduction vs Wanda: max {100 * v[-1]:5.1f}%  median {100 * statistics.median(v):5.1f}%"
                  f"  min {100 * v[0]:5.1f}%  ({len(v)} layers)  by type: "
                  + ", ".join(f"{t.split('_')[0]} {100 * x:.0f}%" for t, x in by_type.items()))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(labels), len(sps), figsize=(4.2 * len(sps), 3.4 * len(labels)), squeeze=False,
                             sharey=True)
    cmap = plt.get_cmap("tab10")
    for i, lab in enumerate(labels):
        for j, sp in enumerate(sps):
            ax = axes[i][j]
            for t_i, t in enumerate(TYPES):
                pts = [(b, 100 * x) for b, ty, x in data.get((sp, lab), []) if ty == t]
                if pts:
                    ax.plot(*zip(*sorted(pts)), marker=".", lw=0.8, color=cmap(t_i), label=t)
            ax.set_title(f"{lab}, {sp}")
            ax.set_xlabel("block")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("layer error reduction vs Wanda (%)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    out = Path(a.out) if a.out else folder / "per_layer_error.png"
    fig.savefig(out, dpi=110)
    out.with_suffix(".json").write_text(json.dumps(stats, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
