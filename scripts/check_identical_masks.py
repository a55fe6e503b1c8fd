"""Bit-for-bit check of pruned weights across a refactor: hashes every pruned tensor of every
method on the tiny random models of each architecture and on the first four blocks of the real
SmolLM2-135M, and compares them with a stored reference.

    python scripts/check_identical_masks.py --save results/mask_hashes.json       # on the old code
    python scripts/check_identical_masks.py --compare results/mask_hashes.json    # on the new code

``--side old`` runs the cases with the option names of the code before the method registry
(``sparsefw`` with ``iterations 0`` was warmstart + swaps); the default ``new`` uses today's names.
One thread, float32, calibration 8 x 32 random tokens (tiny) and 8 x 128 ``wiki`` tokens (SmolLM2).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# case label -> (options on the code before the registry, options today)
CASES = {
    "magnitude": ({"method": "magnitude"}, {"method": "magnitude"}),
    "wanda": ({"method": "wanda"}, {"method": "wanda"}),
    "ria": ({"method": "ria"}, {"method": "ria"}),
    "sparsegpt": ({"method": "sparsegpt"}, {"method": "sparsegpt"}),
    "swaps": ({"method": "sparsefw", "iterations": 0}, {"method": "swaps"}),
    "swaps+rec": ({"method": "sparsefw", "iterations": 0, "reconstruct": True},
                  {"method": "swaps", "reconstruct": True}),
    "sparsefw_it20": ({"method": "sparsefw", "iterations": 20, "alpha": 0.9, "swaps": 50},
                      {"method": "sparsefw", "iterations": 20, "alpha": 0.9, "swaps": 50}),
    "sparsefw_it20_noswaps": ({"method": "sparsefw", "iterations": 20, "alpha": 0.9, "swaps": 0},
                              {"method": "sparsefw", "iterations": 20, "alpha": 0.9, "swaps": 0}),
}
PATTERNS = {"0.6": {"sparsity": 0.6}, "2:4": {"pattern": "2:4"}}


def _config(opts: dict):
    try:
        from sparsefw.config import PruneConfig
    except ImportError:
        from sparsefw.config import PruneConfig
    return PruneConfig(**opts)


def _hashes(model) -> dict:
    from sparsefw.models import decoder_blocks, get_weight, prunable_layers

    out = {}
    for bi, block in enumerate(decoder_blocks(model)):
        for n, layer in prunable_layers(block).items():
            W = get_weight(layer).detach().float().contiguous()
            out[f"{bi}.{n}"] = hashlib.sha256(W.numpy().tobytes()).hexdigest()[:16]
    return out


def _models():
    from conftest import ARCHS, tiny_model

    for arch in ARCHS:
        g = torch.Generator().manual_seed(1)
        yield arch, (lambda a=arch: tiny_model(a, 128, hidden=64)), torch.randint(0, 128, (8, 32), generator=g)
    from sparsefw.calibration import calibration_windows
    from sparsefw.models import load_model

    _, tok = load_model("smollm2-135m")
    win = calibration_windows(tok, "wiki", 8, 128, 0)

    def smol():
        m, _ = load_model("smollm2-135m")
        m.model.layers = m.model.layers[:4]
        m.config.num_hidden_layers = 4
        return m
    yield "smollm2-4blocks", smol, win


def run(side: str) -> dict:
    from sparsefw.pipeline import prune_model

    torch.set_num_threads(1)
    res = {}
    for name, build, windows in _models():
        for case, (old, new) in CASES.items():
            for pl, pk in PATTERNS.items():
                model = build()
                cfg = _config({**(old if side == "old" else new), **pk})
                prune_model(model, None, cfg, windows=windows, progress=False)
                res[f"{name}|{case}|{pl}"] = _hashes(model)
                print(name, case, pl, flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=("old", "new"), default="new")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--save")
    g.add_argument("--compare")
    a = ap.parse_args()
    res = run(a.side)
    if a.save:
        Path(a.save).write_text(json.dumps(res, indent=1, sort_keys=True))
        print(f"{len(res)} cases saved to {a.save}")
        return 0
    ref = json.loads(Path(a.compare).read_text())
    bad = [k for k in ref if res.get(k) != ref[k]]
    print(f"{len(ref) - len(bad)} of {len(ref)} cases bit-for-bit identical")
    for k in bad:
        diff = [n for n in ref[k] if res.get(k, {}).get(n) != ref[k][n]]
        print(f"  DIFFERENT {k}: {len(diff)} tensors, e.g. {diff[:3]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
