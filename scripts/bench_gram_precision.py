"""How precise is each way of summing the Gram matrix G = sum_w X_w^T X_w, on real layers?

Inputs: the calibration activations entering every distinct input (q/k/v, o, gate/up, down) of
blocks 0, 15 and 29 of the packaged SmolLM2-135M (16 x 256 tokens of the offline wiki text, dense
model). Every window's product P_w = X_w^T X_w is computed in float32 (as the pipeline does), and
summed over the windows by:

* ``float32``: plain float32 sums in window order;
* ``float64``: plain float64 sums in window order (depends on the order and on the split across
  processes);
* ``double-double``: float64 chunk sums added as an unevaluated pair hi + lo with TwoSum
  (the earlier design: three float64 buffers per input);
* ``int64 fixed point``: :class:`sparsefw.gram.FixedPointSum` (the current design: one int64
  buffer per input, exact integer sums on a grid fixed from a bound over all windows).

Reference: the same float32 products summed in ``numpy.longdouble`` (80-bit, 64-bit mantissa).
Also reported: the error of the float32 products themselves (products in float64 instead).
Errors are scale-free: max_ij |G_ij - ref_ij| / sqrt(ref_ii ref_jj) and the relative Frobenius error.

Run: ``python scripts/bench_gram_precision.py`` (about a minute); writes
results/gram_precision.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from sparsefw.calibration import calibration_windows
from sparsefw.capture import block_forward, capture_block_inputs, layer_groups
from sparsefw.distributed import Ranks
from sparsefw.gram import FixedPointSum, fixed_point_scale
from sparsefw.models import decoder_blocks, load_model, prunable_layers


def group_inputs(block, inps, extra) -> dict[str, list[torch.Tensor]]:
    """{first layer of each input group: the (tokens, d) float32 inputs of every window}."""
    groups = layer_groups(block, inps, extra, Ranks())
    xs = {g[0]: [] for g in groups}
    layers = prunable_layers(block)
    hs = [layers[g[0]].register_forward_hook(
        lambda m, i, o, n=g[0]: xs[n].append(i[0].detach().reshape(-1, i[0].shape[-1]).float())) for g in groups]
    with torch.no_grad():
        for h in inps:
            block_forward(block, h, extra)
    for h in hs:
        h.remove()
    return xs


def sums(xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """G by every summation scheme (float64 results) from the float32 window products."""
    prods = [x.t() @ x for x in xs]
    f32 = torch.zeros_like(prods[0])
    f64 = torch.zeros_like(prods[0], dtype=torch.float64)
    hi, lo, chunk = f64.clone(), f64.clone(), f64.clone()
    for i, p in enumerate(prods):
        f32 += p
        f64 += p.double()
        chunk += p.double()
        if (i + 1) % 8 == 0 or i == len(prods) - 1:      # TwoSum of the chunk sum into (hi, lo)
            s = hi + chunk
            bp = s - hi
            lo += (hi - (s - bp)) + (chunk - bp)
            hi, chunk = s, torch.zeros_like(chunk)
    fixed = FixedPointSum(xs[0].shape[1], fixed_point_scale(sum(x.shape[0] for x in xs)
                                                            * max(float(x.abs().max()) for x in xs) ** 2))
    for x in xs:
        fixed.add_(x)
    ref = np.zeros(prods[0].shape, dtype=np.longdouble)
    ref64p = np.zeros(prods[0].shape, dtype=np.longdouble)
    for x, p in zip(xs, prods):
        ref += p.numpy().astype(np.longdouble)
        ref64p += (x.double().t() @ x.double()).numpy().astype(np.longdouble)
    return {"float32": f32.double(), "float64": f64, "double-double": hi + lo, "int64 fixed point": fixed.evaluate(),
            "_ref": ref, "_ref64p": ref64p}


def errors(G, ref: np.ndarray) -> tuple[float, float]:
    """(max |G - ref| / sqrt(ref_ii ref_jj), ||G - ref||_F / ||ref||_F) in long double."""
    g = G.numpy().astype(np.longdouble) if isinstance(G, torch.Tensor) else G
    d = np.sqrt(np.clip(np.diag(ref), 1e-300, None))
    e = np.abs(g - ref)
    return float((e / np.outer(d, d)).max()), float(np.sqrt((e ** 2).sum() / (ref ** 2).sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="0,15,29")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--out", default="results/gram_precision.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", dtype="float32")
    blocks = decoder_blocks(model)
    windows = calibration_windows(tok, "wiki", args.nsamples, args.seqlen, seed=0)
    inps, extra = capture_block_inputs(model, blocks, windows)
    want = {int(b) for b in args.blocks.split(",")}
    rows = []
    for bi, block in enumerate(blocks):
        if bi in want:
            for rep, xs in group_inputs(block, inps, extra[bi]).items():
                s = sums(xs)
                ref = s.pop("_ref")
                row = {"block": bi, "input": rep, "d": xs[0].shape[1], "windows": len(xs),
                       "float32 products vs float64 products": errors(ref, s.pop("_ref64p"))}
                row.update({k: errors(v, ref) for k, v in s.items()})
                rows.append(row)
        if bi >= max(want):
            break
        with torch.no_grad():
            inps = [block_forward(block, h, extra[bi]) for h in inps]
    Path(args.out).write_text(json.dumps(rows, indent=1))
    keys = [k for k in rows[0] if k not in ("block", "input", "d", "windows")]
    print("| block | input | d | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['block']} | {r['input']} | {r['d']} | " + " | ".join(f"{r[k][0]:.1e} / {r[k][1]:.1e}" for k in keys) + " |")
    print("(entries: max |error| / sqrt(G_ii G_jj)  /  relative Frobenius error, against long-double sums)")


if __name__ == "__main__":
    main()
