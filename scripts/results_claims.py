"""The paper's claims confronted with our cells, and the time/quality frontier.

Reads the finished cells of comparison configs (default: ``configs/results_*.yaml``; each config's
``output``/cells) and writes, into ``--out`` (default ``results/claims``): ``claims.md`` /
``claims.json`` and ``frontier.png``.

Claims of "Don't Be Greedy, Just Relax!" (arXiv 2510.13713), checked per model and pattern:

1. "up to 80% lower per-layer error than greedy methods": per layer, 1 - error / error of Wanda's
   mask on the same inputs (each cell stores both, ``layer_errors``); the maximum and the median
   over the layers of the seed-0 (or only) cell of each of our labels.
2. "better perplexity than Wanda and RIA at 50%, 60% and 2:4" (the paper measures WikiText; our
   test text is the config's ``ppl`` source): our label's perplexity (mean over its seeds) against
   Wanda's and RIA's (means over theirs); "holds" when it is below both.
3. The fixed-weights heuristic (alpha = 0.9) is checked by the alpha sweep (configs/alpha_smollm2.yaml,
   scripts/validation_table.py), not here.

The frontier plot: prune seconds (mean over seeds) vs perplexity, one point per label and pattern.

    .venv/bin/python scripts/results_claims.py [CONFIG ...] [--ours sparsefw_swaps0,sparsefw,swaps]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLAIM_PATTERNS = ("0.5", "0.6", "2:4")
DEFAULT_OURS = "sparsefw_swaps0,sparsefw,swaps,sparsefw+rec,swaps+rec"   # our labels in the results configs


def finished(config: str, base: Path = ROOT) -> tuple[dict, Path, dict, int]:
    """(config, output folder, {cell id: finished cell}, number of cells the config asks for) of a
    comparison config (:func:`sparsefw.compare.finished_cells` without the unfinished ones); a
    relative ``output`` is taken from ``base``."""
    from sparsefw.compare import finished_cells

    c, out, cells = finished_cells(config, base=base)
    return c, out, {cid: cell for cid, cell in cells.items() if cell is not None}, len(cells)


def _of(cells: dict, label: str, sp: str) -> list[dict]:
    """The cells of a label at a sparsity (all its seeds), seed 0 (or the only one) first."""
    got = [c for c in cells.values() if c["label"] == label and str(c["sparsity"]) == sp]
    return sorted(got, key=lambda c: (c.get("seed") or 0))


def layer_claim(cells: dict, label: str, sp: str) -> dict | None:
    """Claim 1 for one label and pattern: max / median over layers of 1 - err / err_wanda."""
    got = _of(cells, label, sp)
    if not got:
        return None
    red = [1.0 - e / w for e, w in got[0]["layer_errors"].values() if w > 0]
    return {"max": max(red), "median": statistics.median(red), "layers": len(red)} if red else None


def ppl_claim(cells: dict, label: str, sp: str) -> dict | None:
    """Claim 2 for one label and pattern: mean perplexities of the label, Wanda and RIA."""
    means = {}
    for lab in (label, "wanda", "ria"):
        got = _of(cells, lab, sp)
        if not got:
            return None
        means[lab] = statistics.fmean(c["ppl"] for c in got)
    return {"ours": means[label], "wanda": means["wanda"], "ria": means["ria"],
            "holds": means[label] < min(means["wanda"], means["ria"])}


def build(configs: list[str], ours: list[str]) -> tuple[str, dict]:
    """The claims Markdown and JSON for every config."""
    lines, data = [], {}
    for cfg in configs:
        c, _, cells, _ = finished(cfg)
        model, src = c["model"], (c.get("ppl") or {}).get("source", "boolq")
        lines += [f"### {model}", "", f"Claim 1 (per-layer error vs Wanda's mask; 1 - error / Wanda's, over "
                  f"layers): max / median. Claim 2 (perplexity on {src} below both Wanda's and RIA's).", "",
                  "| method | pattern | layer error reduction, max | median | ppl | Wanda | RIA | claim 2 |",
                  "|---|---|---|---|---|---|---|---|"]
        for label in ours:
            for sp in CLAIM_PATTERNS:
                lc, pc = layer_claim(cells, label, sp), ppl_claim(cells, label, sp)
                data.setdefault(model, {})[f"{label} {sp}"] = {"layer": lc, "ppl": pc}
                if lc is None and pc is None:
                    continue
                lay = [f"{100 * lc['max']:.1f}%", f"{100 * lc['median']:.1f}%"] if lc else ["", ""]
                pp = ([f"{pc['ours']:.2f}", f"{pc['wanda']:.2f}", f"{pc['ria']:.2f}", "holds" if pc["holds"] else "does not hold"]
                      if pc else ["", "", "", "not measured"])
                lines.append("| " + " | ".join([label, sp, *lay, *pp]) + " |")
        lines.append("")
    return "\n".join(lines), data


def frontier(configs: list[str], path: Path) -> None:
    """Prune seconds vs perplexity, one point per label and pattern (mean over seeds), per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4.5), squeeze=False)
    for ax, cfg in zip(axes[0], configs):
        c, _, cells, _ = finished(cfg)
        for sp in [str(s) for s in c["sparsities"]]:
            for label in c["methods"]:
                got = _of(cells, label, sp)
                if got:
                    x = statistics.fmean(g["prune_seconds"] for g in got)
                    y = statistics.fmean(g["ppl"] for g in got)
                    ax.scatter(x, y, s=14)
                    ax.annotate(f"{label} {sp}", (x, y), fontsize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("prune seconds (log)")
        ax.set_ylabel("perplexity (log)")
        ax.set_title(f"{c['model']}: time vs quality")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", help="comparison configs (default: configs/results_*.yaml)")
    ap.add_argument("--ours", default=DEFAULT_OURS)
    ap.add_argument("--out", default=str(ROOT / "results" / "claims"))
    a = ap.parse_args(argv)
    from sparsefw.compare import load_config

    configs = a.configs or sorted(str(p) for p in (ROOT / "configs").glob("results_*.yaml"))
    configs = [x for x in configs if "wanda" in load_config(x)["methods"]]   # the alpha study has no claims table
    md, data = build(configs, a.ours.split(","))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "claims.md").write_text(md)
    (out / "claims.json").write_text(json.dumps(data, indent=1))
    frontier(configs, out / "frontier.png")
    print(md)
    print(f"wrote {out / 'claims.md'}, claims.json, frontier.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
