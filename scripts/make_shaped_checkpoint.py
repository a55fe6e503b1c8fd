"""Random-weight checkpoints at the real shapes of the models users prune, written shard by shard.

    python scripts/make_shaped_checkpoint.py --shape llama3-8b --out /data/llama3-8b-shaped
    python scripts/make_shaped_checkpoint.py --shape llama3-70b --blocks 1 --out /data/llama3-70b-1block

Shapes (the published configs): ``llama3-8b`` (hidden 4096, MLP 14336, 32 blocks, 32 heads / 8 KV
heads, vocab 128256), ``llama3-70b`` (8192, 28672, 80 blocks, 64 / 8), ``qwen2.5-7b`` (3584, 18944,
28 blocks, 28 / 4, vocab 152064, q/k/v biases). ``--blocks K`` writes a K-block slice (the same
blocks, fewer of them); ``--set key=value`` overrides any config field (tests use it for tiny shapes).

Weights (bfloat16 by default): every matrix and the embeddings ~ N(0, 0.02²) (the init of these
models); biases 0; the RMSNorm scales 1, except that in every norm a fixed 0.5% of the hidden
channels (at least 1) get scale 20 — outlier input channels as in real LLMs (Dettmers et al. 2022),
so that a Linear layer's inputs have a few large columns and Wanda's |W|·‖X_j‖ ranks weights
differently from |W|. Every tensor is drawn from its own generator seeded by (--seed, its name), so a
slice holds the same tensors as the full checkpoint. The tokenizer is the packaged SmolLM2 one (ids
< 49152 fit every vocabulary here). Memory: one block (or one row-chunk of the embeddings) at a time;
the files are written into a temporary folder that is renamed into place at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

SHAPES = {
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                       max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
}
STD = 0.02
OUTLIER_FRACTION, OUTLIER_SCALE = 0.005, 20.0
ROW_CHUNK = 8192            # rows of an embedding drawn at once (bounds the float32 draw)


def build_config(shape: str, blocks: int | None, overrides: dict):
    """The transformers config of ``shape`` with ``blocks`` decoder blocks and ``overrides``."""
    from transformers import AutoConfig

    kw = {**SHAPES[shape], **overrides}
    if blocks is not None:
        kw["num_hidden_layers"] = blocks
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg.dtype = "bfloat16"
    return cfg


def _generator(seed: int, name: str) -> torch.Generator:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2 ** 63 - 1)
    return torch.Generator().manual_seed(h)


def draw(name: str, shape: tuple, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The tensor ``name`` (see the module docstring for the distribution)."""
    g = _generator(seed, name)
    if name.endswith("norm.weight"):
        t = torch.ones(shape)
        k = max(1, int(OUTLIER_FRACTION * shape[0]))
        t[torch.randperm(shape[0], generator=_generator(seed, "outlier-channels"))[:k]] = OUTLIER_SCALE
        return t.to(dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    rows = out.view(shape[0], -1)
    for r0 in range(0, shape[0], ROW_CHUNK):
        r1 = min(shape[0], r0 + ROW_CHUNK)
        rows[r0:r1] = (torch.randn(r1 - r0, rows.shape[1], generator=g) * STD).to(dtype)
    return out


def write_checkpoint(shape: str, out: Path, blocks: int | None = None, seed: int = 0, dtype=torch.bfloat16,
                     overrides: dict | None = None, progress: bool = True) -> Path:
    """Write the checkpoint (one safetensors shard per block, one for the rest, the index, config
    and tokenizer) into ``out``, which must not exist. Returns ``out``."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsefw.models import packaged_model_dir

    out = Path(out)
    if out.exists():
        sys.exit(f"error: '{out}' exists; choose a new folder")
    cfg = build_config(shape, blocks, overrides or {})
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    names = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    prefix = "model.layers."
    groups: dict[str, list[str]] = {}
    for n in names:
        key = n[len(prefix):].split(".")[0] if n.startswith(prefix) else "rest"
        groups.setdefault(key, []).append(n)
    order = [str(i) for i in range(cfg.num_hidden_layers)] + ["rest"]
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        wmap, total = {}, 0
        for i, key in enumerate(order):
            shard = f"model-{i + 1:05d}-of-{len(order):05d}.safetensors"
            tensors = {n: draw(n, names[n], dtype, seed) for n in groups[key]}
            save_file(tensors, str(stage / shard), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            wmap.update({n: shard for n in tensors})
            del tensors
            if progress:
                print(f"[{i + 1}/{len(order)}] {shard}", flush=True)
        (stage / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}, indent=2))
        cfg.save_pretrained(stage)
        AutoTokenizer.from_pretrained(str(packaged_model_dir("smollm2-135m"))).save_pretrained(stage)
        (stage / "SHAPE.json").write_text(json.dumps({"shape": shape, "blocks": cfg.num_hidden_layers, "seed": seed,
                                                     "overrides": overrides or {}, "bytes": total}, indent=2))
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--out", required=True, help="new folder for the checkpoint")
    ap.add_argument("--blocks", type=int, default=None, help="write a K-block slice (default: all blocks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field (int/float/bool/str), e.g. --set hidden_size=64")
    a = ap.parse_args(argv)
    if a.blocks is not None and a.blocks < 1:
        sys.exit("error: --blocks must be >= 1")
    overrides = {}
    for kv in a.set:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = json.loads(v.lower() if v.lower() in ("true", "false") else v)
        except json.JSONDecodeError:
            overrides[k] = v
    out = write_checkpoint(a.shape, Path(a.out), a.blocks, a.seed, overrides=overrides)
    print(f"wrote {out} ({json.loads((out / 'SHAPE.json').read_text())['bytes'] / 2 ** 30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
