"""Benchmark the FW mask solver on real SmolLM2-135M layers (shapes and activations).

Prints, in one run:
  1. the GEMM GFLOP/s this machine reaches (float32, d_out x d_in @ d_in x d_in);
  2. time per FW iteration, incremental P = (W ⊙ M) G update vs dense recomputation of
     (W ⊙ (1-M)) G, on the same layers with the same iterates (ratio);
  3. rounded relative error vs iterations for the `harmonic` (2/(t+2)) and `linesearch` rules,
     and the iteration at which each first reaches the 2000-iteration harmonic error.
Results are also written as JSON (--out).

    python scripts/bench_solver.py --blocks 10 --sparsity 0.5 --alpha 0.9 --iters 60
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparsefw.calibration import calibration_windows
from sparsefw.fw import fw_solve
from sparsefw.masks import parse_pattern, wanda_scores
from sparsefw.models import decoder_blocks, load_model
from sparsefw.paths import cache_dir
from sparsefw.onload import capture_block_inputs
from sparsefw.pipeline import _block_forward, accumulate_grams


def real_layers(model_name: str, blocks: list[int], nsamples: int, seqlen: int, seed: int = 0) -> dict:
    """{"block.layer": (W (d_out, d_in) float32, G (d_in, d_in) float64)} from dense-model inputs,
    cached in the SparseFW cache folder."""
    key = cache_dir() / f"bench_grams_{model_name}_{'-'.join(map(str, blocks))}_{nsamples}x{seqlen}_{seed}.pt"
    if key.exists():
        return torch.load(key)
    model, tok = load_model(model_name)
    windows = calibration_windows(tok, "wiki", nsamples, seqlen, seed)
    bl = decoder_blocks(model)
    with torch.no_grad():
        inps, extra = capture_block_inputs(model, bl, windows)
        out = {}
        for i in range(max(blocks) + 1):
            if i in blocks:
                grams = accumulate_grams(bl[i], inps, extra[i])
                for n, l in bl[i].named_modules():
                    if n in grams:
                        out[f"{i}.{n}"] = (l.weight.detach().float().clone(), grams[n])
            inps = [_block_forward(bl[i], h, extra[i]) for h in inps]
    torch.save(out, key)
    return out


def gemm_gflops(d_out: int, d_in: int, reps: int = 5) -> float:
    A, B = torch.randn(d_out, d_in), torch.randn(d_in, d_in)
    A @ B
    t = time.perf_counter()
    for _ in range(reps):
        A @ B
    return 2 * d_out * d_in * d_in * reps / (time.perf_counter() - t) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="10")
    ap.add_argument("--layers", default="mlp", help="mlp | attn | all")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--iters", type=int, default=60, help="iterations for the timing comparison")
    ap.add_argument("--curve-iters", type=int, default=2000, help="iterations for the error curves (0 = skip)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--out", default="bench_solver.json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    blocks = [int(b) for b in a.blocks.split(",")]
    layers = real_layers(a.model, blocks, a.nsamples, a.seqlen)
    sel = {"mlp": ("mlp.",), "attn": ("self_attn.",), "all": ("",)}[a.layers]
    layers = {k: v for k, v in layers.items() if any(s in k for s in sel)}
    pattern = parse_pattern(a.pattern, a.sparsity)
    res = {"threads": torch.get_num_threads(), "args": vars(a), "layers": {}}

    print(f"torch threads: {torch.get_num_threads()}")
    for shape in sorted({tuple(W.shape) for W, _ in layers.values()}):
        g = gemm_gflops(*shape)
        res.setdefault("gemm_gflops", {})[f"{shape[0]}x{shape[1]}"] = g
        print(f"GEMM ({shape[0]}x{shape[1]}) @ ({shape[1]}x{shape[1]}): {g:.0f} GFLOP/s")

    print(f"\n== time per FW iteration, {a.pattern} {a.sparsity:.0%}, alpha {a.alpha}, {a.iters} iterations, "
          "line search, same iterates ==")
    tot = {"incremental": 0.0, "dense": 0.0}
    for name, (W, G) in layers.items():
        sc = wanda_scores(W, G.diagonal().clamp_min(0).sqrt())
        row = {}
        for mode in ("dense", "incremental"):
            # round_at=(): time the FW iterations only, without the candidate roundings
            r = fw_solve(W, G, sc, pattern, alpha=a.alpha, iterations=a.iters, step="linesearch", tol=0,
                         incremental=mode == "incremental", round_at=())
            row[mode] = {"ms_per_iter": 1000 * r.loop_seconds / max(r.iterations, 1), "iterations": r.iterations,
                         "error": r.error_rounded, "mask": r.mask}
            tot[mode] += r.loop_seconds / max(r.iterations, 1)
        same = bool((row["dense"]["mask"] == row["incremental"]["mask"]).float().mean() > 0.999)
        for m in row.values():
            m.pop("mask")
        ratio = row["dense"]["ms_per_iter"] / row["incremental"]["ms_per_iter"]
        res["layers"][name] = {"shape": list(W.shape), **row, "ratio": ratio, "same_masks": same}
        print(f"{name:24s} {str(tuple(W.shape)):13s} dense {row['dense']['ms_per_iter']:7.1f} ms  "
              f"incremental {row['incremental']['ms_per_iter']:6.1f} ms  ratio {ratio:4.1f}x  same masks: {same}")
    res["ratio_total"] = tot["dense"] / tot["incremental"]
    print(f"all layers: dense {1000 * tot['dense']:.1f} ms vs incremental {1000 * tot['incremental']:.1f} ms "
          f"per iteration -> {res['ratio_total']:.2f}x")

    if a.curve_iters:
        print(f"\n== rounded relative error vs iterations (T = {a.curve_iters}) ==")
        checkpoints = sorted({1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000} & set(range(1, a.curve_iters + 1)))
        curves = {}
        for name, (W, G) in layers.items():
            sc = wanda_scores(W, G.diagonal().clamp_min(0).sqrt())
            for step in ("harmonic", "linesearch"):
                r = fw_solve(W, G, sc, pattern, alpha=a.alpha, iterations=a.curve_iters, step=step, tol=0,
                             record_at=set(checkpoints), record_rounded=True)
                rec = [(c, rr, c) for c, _, rr in r.history]
                if r.iterations < a.curve_iters:  # line search converged (eta = 0): the rest is flat
                    rec += [(c, r.error_rounded, r.iterations) for c in checkpoints if c > r.iterations]
                curves.setdefault(name, {})[step] = {"warm": r.error_warmstart, "points": rec,
                                                     "relaxed_final": r.relaxed_error, "iterations": r.iterations}
            h_final = curves[name]["harmonic"]["points"][-1][1]
            line = f"{name:24s} warm {curves[name]['harmonic']['warm']:.5f} |"
            for step in ("harmonic", "linesearch"):
                pts = curves[name][step]["points"]
                reach = next((c for c, e, _ in pts if e <= h_final * 1.001), None)
                curves[name][step]["reaches_T_error_at"] = reach
                line += f" {step}: " + " ".join(f"{c}:{e:.5f}" for c, e, _ in pts if c in (1, 10, 50, 200, a.curve_iters)) \
                    + f" (reaches T-error at {reach}) |"
            print(line)
        res["curves"] = curves

        print("\n== stopping tolerance (line search, cap T): stop when FW gap <= tol * f(warmstart) ==")
        res["tolerance"] = {}
        for tol in (3e-2, 1e-2, 3e-3, 1e-3):
            row = {}
            for name, (W, G) in layers.items():
                sc = wanda_scores(W, G.diagonal().clamp_min(0).sqrt())
                r = fw_solve(W, G, sc, pattern, alpha=a.alpha, iterations=a.curve_iters, step="linesearch", tol=tol)
                t_err = curves[name]["harmonic"]["points"][-1][1]
                row[name] = {"iterations": r.iterations, "error": r.error_final, "vs_T_error": r.error_final / t_err - 1}
            res["tolerance"][str(tol)] = row
            print(f"tol {tol:g}: " + " | ".join(f"{n} stops at {v['iterations']} it, error {v['vs_T_error']:+.2%} vs T"
                                             for n, v in row.items()))
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
