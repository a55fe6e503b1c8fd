"""1 vs 2 processes on the CPU: SmolLM2-135M, 60%, SparseFW, 32 x 512 calibration.

Runs the same prune three times in one go, each in fresh processes: 1 process x 1 thread,
1 process x 2 threads, 2 processes x 1 thread (torchrun, gloo); prints the wall times, the ratios
and whether the saved masks and weights are identical (torch.equal). Needs an otherwise idle
2-core machine for meaningful ratios.

    python scripts/bench_distributed.py [--out runs/bench_distributed] [--model smollm2-135m]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def run(nproc: int, threads: int, out: Path, args) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "sparsefw", "prune", "--model", args.model, "--method", "sparsefw", "--sparsity", "0.6",
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu",
           "--output", str(out), "--overwrite", "--no-eval-ppl"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{nproc} x {threads} failed:\n{r.stderr[-3000:]}")
    return wall


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_distributed")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    a = ap.parse_args(argv)
    out = Path(a.out)
    res = {"model": a.model, "nsamples": a.nsamples, "seqlen": a.seqlen, "wall_s": {}}
    for nproc, threads in ((1, 1), (1, 2), (2, 1)):
        key = f"{nproc}x{threads}"
        res["wall_s"][key] = run(nproc, threads, out / key, a)
        print(f"{nproc} process(es) x {threads} thread(s): {res['wall_s'][key]:.0f} s", flush=True)
    ref = tensors(out / "1x1")
    res["identical"] = {k: all(torch.equal(v, t[n]) for n, v in ref.items())
                        for k in ("1x2", "2x1") for t in [tensors(out / k)]}
    w = res["wall_s"]
    res["speedup_2x1_vs_1x1"] = w["1x1"] / w["2x1"]
    res["speedup_2x1_vs_1x2"] = w["1x2"] / w["2x1"]
    print(f"2x1 vs 1x1: {res['speedup_2x1_vs_1x1']:.2f}x (goal >= 1.6); 2x1 vs 1x2: "
          f"{res['speedup_2x1_vs_1x2']:.2f}x (goal > 1); identical to 1x1: {res['identical']}")
    (out / "bench_distributed.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
