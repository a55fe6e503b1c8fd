"""GPU check: SparseFW and the baselines on random-weight Llama-architecture models at
SmolLM2-135M's and Llama-3-8B's layer shapes, in bf16, on one device.

Needs only torch, transformers, accelerate, safetensors, huggingface_hub (no lm-eval, no datasets,
no downloads): the models are built from configs with random weights and the calibration windows
are random token ids. Prints, per method (wanda, sparsegpt, sparsefw, sparsefw + reconstruction) at
50% and 2:4: wall seconds per decoder block and peak device memory; the agreement of one layer's
SparseFW mask and error between CPU and the device (same seed); and an extrapolated wall time of a
full 32-block 8B prune with 128 x 2048 calibration.

    bash scripts/gpu_check.sh                        # on a machine with an NVIDIA GPU (< 8 minutes)
    bash scripts/gpu_check.sh --device cpu --small   # small shapes on the CPU (the test suite runs this)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from sparsefw.fw import fw_solve
from sparsefw.masks import parse_pattern, wanda_scores
from sparsefw.models import resolve_device
from sparsefw.config import PruneConfig
from sparsefw.pipeline import prune_model

METHODS = {"wanda": dict(method="wanda"), "sparsegpt": dict(method="sparsegpt"),
           "sparsefw": dict(method="sparsefw"), "sparsefw+rec": dict(method="sparsefw", reconstruct=True)}
PATTERNS = {"50%": dict(pattern="unstructured", sparsity=0.5), "2:4": dict(pattern="2:4", sparsity=None)}
SHAPES = {  # name: (hidden, intermediate, heads, kv heads)
    "smollm2-135m": (576, 1536, 9, 3), "llama3-8b": (4096, 14336, 32, 8),
    "small-a": (64, 192, 4, 2), "small-b": (128, 448, 8, 2)}


def build(shape: str, blocks: int, device, dtype, vocab: int, seed: int = 0):
    import transformers as tf

    h, f, nh, nkv = SHAPES[shape]
    cfg = tf.LlamaConfig(hidden_size=h, intermediate_size=f, num_attention_heads=nh, num_key_value_heads=nkv,
                         num_hidden_layers=blocks, vocab_size=vocab, max_position_embeddings=8192)
    torch.manual_seed(seed)
    with torch.device(device):
        m = tf.LlamaForCausalLM(cfg).to(dtype).eval()
    return m


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_method(shape, blocks, device, dtype, vocab, nsamples, seqlen, opts):
    model = build(shape, blocks, device, dtype, vocab)
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, vocab, (nsamples, seqlen), generator=g)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    rep = prune_model(model, None, PruneConfig(device=str(device), nsamples=nsamples, seqlen=seqlen, **opts),
                      windows=windows, progress=False)
    sync(device)
    wall = time.perf_counter() - t0
    solve = sum(L["seconds"] for L in rep["layers"])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del model
    return {"s_per_block": wall / blocks, "solve_s_per_block": solve / blocks,
            "forward_s_per_block": (wall - solve) / blocks, "peak_gib": None if peak is None else peak / 2 ** 30,
            "err_vs_wanda": -rep["error_reduction_vs_wanda"]}


def agreement(device) -> dict:
    """One SmolLM2-shaped layer (1536 x 576), correlated heavy-tailed inputs: SparseFW on the CPU
    and on ``device`` from the same W and G."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(1536, 576, generator=g) * 0.02
    X = torch.randn(576, 4096, generator=g)
    X = (torch.randn(576, 576, generator=g) * 0.1 + torch.eye(576)) @ X * torch.rand(576, 1, generator=g).pow(3) * 5
    G = (X @ X.T).double()
    pat = parse_pattern("unstructured", 0.5)
    scores = wanda_scores(W, torch.diagonal(G).sqrt().float())
    a = fw_solve(W, G.float(), scores, pat)
    b = fw_solve(W.to(device), G.float().to(device), scores.to(device), pat)
    return {"mask_agreement": float((a.mask == b.mask.cpu()).float().mean()),
            "error_cpu": a.error_final, "error_device": b.error_final,
            "error_rel_diff": abs(a.error_final - b.error_final) / a.error_final,
            "iterations_cpu": a.iterations, "iterations_device": b.iterations}


def semi_structured_speedup(device, dtype, shape=(4096, 14336), tokens=(1, 16, 2048), reps=20) -> dict:
    """Matmul time of a 2:4 layer with PyTorch's semi-structured sparse kernels vs dense, on CUDA.

    W (d_out, d_in) random with a 2:4 mask (the two largest |w| of every group of 4 kept),
    X (tokens, d_in); y = X W^T by ``torch.nn.functional.linear`` with the dense W and with
    ``torch.sparse.to_sparse_semi_structured(W)``. Returns {tokens: {"dense_ms", "sparse_ms",
    "speedup", "max_abs_diff"}} or {"skipped": reason} (CPU, or kernels unavailable)."""
    if device.type != "cuda":
        return {"skipped": "semi-structured sparse kernels need a CUDA GPU"}
    try:
        from torch.sparse import to_sparse_semi_structured

        d_out, d_in = shape
        dt = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
        W = torch.randn(d_out, d_in, device=device, dtype=dt)
        g = W.abs().view(d_out, d_in // 4, 4)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.topk(2, dim=2).indices, True)
        W = W * keep.view(d_out, d_in)
        Ws = to_sparse_semi_structured(W)
        out = {"shape": list(shape), "dtype": str(dt).replace("torch.", "")}
        for n in tokens:
            X = torch.randn(max(n, 1), d_in, device=device, dtype=dt)
            times = {}
            for name, w in (("dense", W), ("sparse", Ws)):
                for _ in range(3):
                    y = torch.nn.functional.linear(X, w)
                torch.cuda.synchronize(device)
                t = time.perf_counter()
                for _ in range(reps):
                    y = torch.nn.functional.linear(X, w)
                torch.cuda.synchronize(device)
                times[name] = (time.perf_counter() - t) / reps * 1e3
                times[name + "_y"] = y
            diff = float((times.pop("dense_y").float() - times.pop("sparse_y").float()).abs().max())
            out[str(n)] = {"dense_ms": times["dense"], "sparse_ms": times["sparse"],
                           "speedup": times["dense"] / times["sparse"], "max_abs_diff": diff}
        return out
    except Exception as e:  # noqa: BLE001 - report, do not fail the whole check
        return {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--small", action="store_true", help="tiny shapes and calibration (a CPU test)")
    ap.add_argument("--budget-s", type=float, default=420, help="skip the remaining runs after this many seconds")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    device = resolve_device(a.device)
    dtype = getattr(torch, a.dtype)
    t_start = time.perf_counter()
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "dtype": a.dtype}
    import transformers

    info["transformers"] = transformers.__version__
    print(json.dumps(info))
    if a.small:
        plan = [("small-a", 1, 512, 2, 32), ("small-b", 1, 512, 2, 32)]
        target = "small-b"
    else:   # (shape, blocks, vocab, nsamples, seqlen)
        plan = [("smollm2-135m", 4, 49152, 32, 512), ("llama3-8b", 2, 32000, 8, 2048)]
        target = "llama3-8b"
    results = {"info": info, "runs": {}, "skipped": []}
    print(f"{'model':>14} {'method':>13} {'pattern':>7} {'s/block':>8} {'solve s':>8} {'fwd s':>7} "
          f"{'peak GiB':>8} {'err vs Wanda':>12}")
    for shape, blocks, vocab, ns, sl in plan:
        for meth, mo in METHODS.items():
            for pname, po in PATTERNS.items():
                key = f"{shape}/{meth}/{pname}"
                if time.perf_counter() - t_start > a.budget_s:
                    results["skipped"].append(key)
                    continue
                r = run_method(shape, blocks, device, dtype, vocab, ns, sl, {**mo, **po})
                r.update(blocks=blocks, nsamples=ns, seqlen=sl)
                results["runs"][key] = r
                peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
                print(f"{shape:>14} {meth:>13} {pname:>7} {r['s_per_block']:8.2f} {r['solve_s_per_block']:8.2f} "
                      f"{r['forward_s_per_block']:7.2f} {peak:>8} {100 * r['err_vs_wanda']:+11.1f}%", flush=True)
    if device.type != "cpu" or a.small:
        ag = agreement(device)
        results["cpu_vs_device"] = ag
        print(f"SparseFW on one 1536x576 layer, CPU vs {device}: masks agree on {100 * ag['mask_agreement']:.3f}% "
              f"of entries; relative error {ag['error_cpu']:.6f} vs {ag['error_device']:.6f} "
              f"(rel. diff {ag['error_rel_diff']:.2e}); iterations {ag['iterations_cpu']} / {ag['iterations_device']}")
    ss = semi_structured_speedup(device, dtype)
    results["semi_structured_2of4"] = ss
    if "skipped" in ss:
        print(f"2:4 semi-structured matmul: skipped ({ss['skipped']})")
    else:
        for n in (k for k in ss if k.isdigit()):
            r = ss[n]
            print(f"2:4 semi-structured matmul {ss['shape'][0]}x{ss['shape'][1]} {ss['dtype']}, {n} tokens: dense "
                  f"{r['dense_ms']:.3f} ms, 2:4 {r['sparse_ms']:.3f} ms, speed-up {r['speedup']:.2f}x")
    # extrapolation: solve time per block is independent of the calibration size, the forward and
    # Gram accumulation scale with the number of calibration tokens
    results["extrapolated_8b_minutes"] = {}
    for key, r in results["runs"].items():
        if key.startswith(target):
            scale = 128 * 2048 / (r["nsamples"] * r["seqlen"])
            minutes = 32 * (r["solve_s_per_block"] + r["forward_s_per_block"] * scale) / 60
            results["extrapolated_8b_minutes"][key] = minutes
            print(f"extrapolated full 32-block prune with 128 x 2048 calibration, {key}: {minutes:.1f} min")
    if results["skipped"]:
        print(f"skipped (time budget {a.budget_s:.0f} s): {', '.join(results['skipped'])}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
