"""Where a prune's time goes, per method, in one run: SmolLM2-135M, 64 x 512 calibration,
60% and 2:4, wanda / sparsegpt / swaps / sparsefw / sparsefw + --reconstruct, library defaults.

Prints per method and pattern: wall seconds split into calibration forward, Gram accumulation,
warmstart, FW iterations, rounding/safeguard, swap refinement, reconstruction, the method's own
solve (SparseGPT, Wanda), reporting (errors for the report) and the rest; the FW iterations
(mean / p50 / p90 / max over layers) and layers at the cap; the mean relative layer error; and
the wall-time ratios against SparseGPT. Writes results/bench_prune.json and results/bench_prune.md.

    python scripts/bench_prune.py [--model smollm2-135m] [--nsamples 64] [--seqlen 512] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparsefw import api

PARTS = ("calibration_forward", "gram", "warmstart", "fw_iterations", "rounding", "swaps",
         "reconstruction", "solve", "reporting", "other")
METHODS = {"wanda": dict(method="wanda"), "sparsegpt": dict(method="sparsegpt"), "swaps": dict(method="swaps"),
           "sparsefw": dict(method="sparsefw"), "sparsefw+rec": dict(method="sparsefw", reconstruct=True)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--patterns", default="0.6,2:4")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--out", default="results/bench_prune")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = {"model": a.model, "nsamples": a.nsamples, "seqlen": a.seqlen, "threads": torch.get_num_threads(),
           "cells": {}}
    for pat in a.patterns.split(","):
        sp = dict(pattern=pat) if ":" in pat else dict(pattern="unstructured", sparsity=float(pat))
        for name in a.methods.split(","):
            t = time.perf_counter()
            rep = api.prune(a.model, eval_ppl=False, nsamples=a.nsamples, seqlen=a.seqlen, device="cpu",
                            progress=False, **sp, **METHODS[name]).report
            wall = time.perf_counter() - t
            cell = {"wall_s": wall, "prune_s": rep["seconds"], "timings": rep["timings"],
                    "fw_iterations": rep["fw_iterations"], "layers_at_cap": rep["layers_at_iteration_cap"],
                    "mean_error_final": rep["mean_error_final"], "mean_error_wanda": rep["mean_error_wanda"],
                    "swaps": rep["swaps_applied"]}
            res["cells"][f"{name} {pat}"] = cell
            tm = rep["timings"]
            print(f"{name:13s} {pat:4s} wall {wall:6.1f} s  prune {rep['seconds']:6.1f} s  err {rep['mean_error_final']:.5f}  "
                  + " ".join(f"{k} {tm.get(k, 0.0):.1f}" for k in PARTS)
                  + f"  FW iterations {rep['fw_iterations']}", flush=True)
    lines = ["| method | pattern | prune s | vs SparseGPT | mean layer error | " + " | ".join(PARTS) + " | FW it. mean/p50/p90/max |",
             "|---|---|---|---|---|" + "---|" * len(PARTS) + "---|"]
    for key, c in res["cells"].items():
        name, pat = key.split(" ")
        ref = res["cells"].get(f"sparsegpt {pat}")
        ratio = c["prune_s"] / ref["prune_s"] if ref else float("nan")
        c["ratio_vs_sparsegpt"] = ratio
        it = c["fw_iterations"]
        lines.append(f"| {name} | {pat} | {c['prune_s']:.0f} | {ratio:.2f}x | {c['mean_error_final']:.5f} | "
                     + " | ".join(f"{c['timings'].get(k, 0.0):.1f}" for k in PARTS)
                     + f" | {it['mean']:.0f}/{it['p50']}/{it['p90']}/{it['max']} |")
    md = "\n".join(lines)
    print("\n" + md)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
