"""Benchmark the FW mask solver on real SmolLM2-135M layers (shapes and activations).

Prints, in one run:
  1. the GEMM GFLOP/s this machine reaches (float32, d_out x d_in @ d_in x d_in);
  2. time per FW iteration, incremental P = (W ⊙ M) G update vs dense recomputation of
     (W ⊙ (1-M)) G, on the same layers with the same iterates (ratio);
  3. rounded relative error vs iterations for the `harmonic` (2/(t+2)) and `linesearch` rules,
     and the iteration at which each first reaches the 2000-iteration harmonic error.
Results are also written as JSON (--out).

    python scripts/bench_solver.py --blocks 10 --sparsity 0.5 --alpha 0.9 --iters 60

``--scaling SHAPES`` instead times one synthetic layer per shape (random W, correlated heavy-tailed
inputs), SparseFW with the library defaults vs SparseGPT in one run, and fits the growth exponent
of time vs d_in:

    python scripts/bench_solver.py --threads 1 --scaling 1536x576,576x1536,896x4864,4096x14336

``--products WIDTHS`` times the two paths of the sparse product update (GEMM vs gather of rows of G)
per width and density, for ``sparsefw.fw.DENSE_ABOVE``:

    python scripts/bench_solver.py --threads 2 --products 576,1536,4096,14336 --out results/bench_products.json

``--row-blocks WIDTHS`` times the kernels that ``sparsefw.gram.by_row_blocks`` runs 64 rows at a time
(float64 row sums, counts of differing entries, the swap candidates) whole vs in row blocks, per
width (1024 rows), and checks that the bits agree:

    python scripts/bench_solver.py --threads 1 --row-blocks 4096,7885,14336,28672
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
from sparsefw.capture import capture_block_inputs
from sparsefw.capture import block_forward, evaluate_grams


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
                grams = evaluate_grams(bl[i], inps, extra[i])
                for n, l in bl[i].named_modules():
                    if n in grams:
                        out[f"{i}.{n}"] = (l.weight.detach().float().clone(), grams[n])
            inps = [block_forward(bl[i], h, extra[i]) for h in inps]
    torch.save(out, key)
    return out


def synthetic_layer(d_out: int, d_in: int, tokens: int = 4096, seed: int = 0):
    """Random W (d_out, d_in) and the Gram matrix (d_in, d_in) float64 of correlated heavy-tailed
    inputs: Student-t (3 dof) features, each mixed with its neighbour, scaled by log-normal per-feature
    magnitudes (a few outlier features, as in LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    T = torch.distributions.StudentT(3.0).sample((d_in, tokens)).float()
    X = T + 0.7 * torch.roll(T, 1, 0)
    X *= torch.exp(torch.randn(d_in, 1, generator=g))
    G = (X @ X.T).double()
    del X, T
    return torch.randn(d_out, d_in, generator=g) * 0.02, G


def scaling(shapes: list, pattern, tokens: int) -> dict:
    """One layer per shape, SparseFW (library defaults, with the dense-norm GEMM the pipeline pays)
    vs SparseGPT, in this process; the growth exponent of time vs d_in (least squares on logs)."""
    import math

    from sparsefw.fw import dense_output_norm, relative_error
    from sparsefw.masks import select
    from sparsefw.config import PruneConfig
    from sparsefw.sparsegpt_sparsify import sparsegpt_prune
    from sparsefw.fw import weight_error

    d = PruneConfig(method="sparsefw").method_options()
    out = {}
    for d_out, d_in in shapes:
        W, G = synthetic_layer(d_out, d_in, tokens)
        Gf = G.float()
        sc = wanda_scores(W, G.diagonal().clamp_min(0).sqrt())
        t = time.perf_counter()
        dn = dense_output_norm(W, Gf)
        r = fw_solve(W, Gf, sc, pattern, alpha=d["alpha"], iterations=d["iterations"], step=d["step"],
                     tol=d["tol"], swaps=d["swaps"], dense_norm=dn)
        t_fw = time.perf_counter() - t
        t = time.perf_counter()
        W_s, _ = sparsegpt_prune(W, G, pattern)
        t_sg = time.perf_counter() - t
        e_sg = weight_error(W, Gf, W_s) / dn
        e_wanda = relative_error(W, Gf, select(sc, pattern))
        out[f"{d_out}x{d_in}"] = {"sparsefw_s": t_fw, "sparsegpt_s": t_sg, "ratio": t_fw / t_sg,
                                  "error_sparsefw": r.error_final, "error_sparsegpt": e_sg, "error_wanda": e_wanda,
                                  "swaps": r.swaps, "swap_rounds": r.swap_rounds}
        print(f"{d_out:5d} x {d_in:5d}: SparseFW {t_fw:8.2f} s  SparseGPT {t_sg:8.2f} s  ratio {t_fw / t_sg:5.2f}x  "
              f"error SparseFW {r.error_final:.4f} SparseGPT {e_sg:.4f} Wanda {e_wanda:.4f}", flush=True)
        del W, G, Gf
    xs = [math.log(d_in) for _, d_in in shapes]
    rows = [out[f"{d_out}x{d_in}"] for d_out, d_in in shapes]
    for key in ("sparsefw_s", "sparsegpt_s"):
        ys = [math.log(v[key]) for v in rows]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-30)
        out[f"exponent_{key[:-2]}"] = slope
        print(f"time ~ d_in^{slope:.2f} for {key[:-2]}")
    return out


def gemm_gflops(d_out: int, d_in: int, reps: int = 5) -> float:
    A, B = torch.randn(d_out, d_in), torch.randn(d_in, d_in)
    A @ B
    t = time.perf_counter()
    for _ in range(reps):
        A @ B
    return 2 * d_out * d_in * d_in * reps / (time.perf_counter() - t) / 1e9


def products(widths: list[int], rows: int = 512, densities=(0.03, 0.05, 0.07, 0.09, 0.11)) -> dict:
    """Seconds of :func:`sparsefw.fw.gram_product` by the GEMM path vs the gather path, per input width
    and density of the change (rows x 0.55 d_in compact columns, as with alpha 0.9 at 50%), and the
    gather/GEMM ratio: the crossing is where ``DENSE_ABOVE`` belongs."""
    from sparsefw.fw import gram_product

    g = torch.Generator().manual_seed(0)
    out = {}
    for d_in in widths:
        X = torch.randn(d_in, 1024, generator=g)
        G = X @ X.T
        del X
        c = int(0.55 * d_in)
        cols = torch.stack([torch.randperm(d_in, generator=g)[:c].sort().values for _ in range(rows)])
        for dens in densities:
            E = torch.randn(rows, c, generator=g) * (torch.rand(rows, c, generator=g) < dens * d_in / c)
            t = {}
            for path, da in (("gemm", 0.0), ("gather", 1.0)):
                gram_product(E, G, cols, da)                 # warm-up
                t0 = time.perf_counter()
                gram_product(E, G, cols, da)
                t[path] = time.perf_counter() - t0
            out[f"{d_in}/{dens:.2f}"] = {**t, "ratio": t["gather"] / t["gemm"]}
            print(f"d_in {d_in:6d} density {dens:.2f}: GEMM {t['gemm']:.3f} s, gather {t['gather']:.3f} s, "
                  f"gather/GEMM {t['gather'] / t['gemm']:.2f}", flush=True)
    return out


def row_blocks(widths: list[int], rows: int = 1024, reps: int = 5) -> dict:
    """Seconds of each row-wise kernel on (rows, d) whole vs :func:`sparsefw.gram.by_row_blocks`,
    the ratio, and whether both give the same bits."""
    import math

    from sparsefw.gram import by_row_blocks
    from sparsefw.swaps import swap_candidates

    g = torch.Generator().manual_seed(0)
    pat = parse_pattern("unstructured", 0.5)
    out = {}
    for d in widths:
        A, B = torch.randn(rows, d, generator=g), torch.randn(rows, d, generator=g)
        M = torch.rand(rows, d, generator=g) < 0.5
        Ak, Ap = (A * A).masked_fill(M, math.inf), (A * A).masked_fill(~M, math.inf)
        kernels = {"row sums float64": (lambda a, b: (a * b).sum(1, dtype=torch.float64), (A, B)),
                   "row diff counts": (lambda m, b: (m != (b > 0)).sum(1), (M, B)),
                   "swap candidates": (lambda w, q, ak, ap: swap_candidates(w, q, ak, ap, pat, 8), (A, B, Ak, Ap))}
        for name, (fn, args) in kernels.items():
            t = {}
            for how, call in (("whole", lambda: fn(*args)), ("blocks", lambda: by_row_blocks(fn, *args))):
                res = call()                                    # warm-up
                t0 = time.perf_counter()
                for _ in range(reps):
                    call()
                t[how] = (time.perf_counter() - t0) / reps
                t[how + "_result"] = res
            same = torch.equal(t.pop("whole_result"), t.pop("blocks_result"))
            out[f"{d}/{name}"] = {**t, "ratio": t["whole"] / t["blocks"], "same_bits": same}
            print(f"{rows} x {d:6d} {name:18s}: whole {1000 * t['whole']:7.1f} ms, row blocks "
                  f"{1000 * t['blocks']:6.1f} ms, {t['whole'] / t['blocks']:4.1f}x, same bits: {same}", flush=True)
    return out


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
    ap.add_argument("--scaling", default="", help="only the scaling run: shapes like 1536x576,576x1536,896x4864,4096x14336")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens of the synthetic scaling layers")
    ap.add_argument("--products", default="",
                    help="only the GEMM-vs-gather crossing: input widths like 576,1536,4096,14336")
    ap.add_argument("--row-blocks", default="", help="only the row-block kernels: widths like 4096,14336")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.row_blocks:
        res = {"threads": torch.get_num_threads(), "row_blocks": row_blocks([int(w) for w in a.row_blocks.split(",")])}
        Path(a.out).write_text(json.dumps(res, indent=1))
        print(f"wrote {a.out}")
        return
    if a.products:
        res = {"threads": torch.get_num_threads(), "products": products([int(w) for w in a.products.split(",")])}
        Path(a.out).write_text(json.dumps(res, indent=1))
        print(f"wrote {a.out}")
        return
    if a.scaling:
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.scaling.split(",")]
        res = {"threads": torch.get_num_threads(), "pattern": f"{a.pattern} {a.sparsity}",
               "scaling": scaling(shapes, parse_pattern(a.pattern, a.sparsity), a.tokens)}
        Path(a.out).write_text(json.dumps(res, indent=1))
        print(f"wrote {a.out}")
        return
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
