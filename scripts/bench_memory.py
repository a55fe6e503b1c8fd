"""Peak resident memory of a SparseFW prune: streaming vs whole model.

Generates (once) a randomly initialised Llama-architecture checkpoint with ~1 GB of float32 decoder
weights and a small vocabulary, so the decoder dominates; then prunes it twice, each in a fresh
process: whole model in memory, and ``--stream``. Each child reports its resident memory after the
imports and its peak (``ru_maxrss``); the script prints both with the terms of the memory formula

    peak - after_imports ≈ embeddings + block weights + activations + Gram matrices + solver state
                           (+ the whole decoder when not streaming)

    python scripts/bench_memory.py [--out runs/bench_memory] [--layers 40] [--nsamples 8 --seqlen 128]

Results are printed and written to OUT/bench_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

GB = 2 ** 30
MB = 2 ** 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_checkpoint(folder: Path, layers: int) -> dict:
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4,
                         num_hidden_layers=layers, vocab_size=2048, tie_word_embeddings=True)
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        m = tf.LlamaForCausalLM(cfg).eval()
        m.save_pretrained(folder, max_shard_size="200MB")
        from sparsefw.models import packaged_model_dir

        tf.AutoTokenizer.from_pretrained(str(packaged_model_dir("smollm2-135m"))).save_pretrained(folder)
    return cfg.to_dict()


def child(mode: str, folder: str, out: str, nsamples: int, seqlen: int) -> None:
    """Runs in a fresh process: import, measure, prune, report peak."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from sparsefw import api
    after_imports = rss_bytes()
    t0 = time.perf_counter()
    # calib.txt holds only words whose SmolLM2 token ids are < 2048, the model's vocabulary
    api.prune(folder, output=out, overwrite=True, method="sparsefw", sparsity=0.5, calib=str(Path(folder) / "calib.txt"),
              nsamples=nsamples, seqlen=seqlen, iterations=5, device="cpu", progress=False,
              stream=mode == "stream")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"mode": mode, "after_imports": after_imports, "peak": peak,
                      "seconds": time.perf_counter() - t0}))


def formula(cfg: dict, nsamples: int, seqlen: int) -> dict:
    d, f, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]
    block = sum(a * b for a, b in shapes) * 4
    big = max(shapes, key=lambda s: s[0] * s[1])
    return {
        "decoder_weights": L * block,
        "block_weights": block,
        "embeddings": V * d * 4,
        "activations": 2 * nsamples * seqlen * d * 4 + 3 * seqlen * f * 4,   # in + out, one window's MLP
        # float64 chunk sum + hi + lo per distinct input (attention in, o in, MLP in, down in),
        # and the evaluated G of every layer
        "grams": 24 * (3 * d * d + f * f) + sum(8 * b * b for _, b in shapes),
        "solver_state": 10 * big[0] * big[1] * 4 + 2 * big[1] ** 2 * 4,   # FW: ~10 (d_out, d_in) float32 + G float32
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_memory")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    out = Path(a.out)
    ckpt = out / "checkpoint"
    if a.child:
        child(a.child[0], str(ckpt), a.child[1], a.nsamples, a.seqlen)
        return
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_checkpoint(ckpt, a.layers)
    (ckpt / "calib.txt").write_text(" ".join(["the of and to in is was for on as with by"] * 4000))
    terms = formula(cfg, a.nsamples, a.seqlen)
    res = {"config": {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")},
           "nsamples": a.nsamples, "seqlen": a.seqlen, "formula_bytes": terms, "runs": {}}
    for mode in ("whole", "stream"):
        r = subprocess.run([sys.executable, __file__, "--out", str(out), "--layers", str(a.layers), "--nsamples",
                            str(a.nsamples), "--seqlen", str(a.seqlen), "--child", mode, str(out / f"pruned_{mode}")],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode != 0:
            sys.exit(f"{mode} run failed:\n{r.stderr[-3000:]}")
        res["runs"][mode] = json.loads(r.stdout.strip().splitlines()[-1])
    dec = terms["decoder_weights"]
    print(f"decoder weights: {dec / GB:.3f} GiB ({cfg['num_hidden_layers']} blocks of {terms['block_weights'] / MB:.1f} MiB)")
    print("formula terms (MiB): " + ", ".join(f"{k} {v / MB:.1f}" for k, v in terms.items() if k != "decoder_weights"))
    pred = sum(v for k, v in terms.items() if k != "decoder_weights")
    print(f"predicted streaming peak above imports: {pred / MB:.0f} MiB; whole model: {(pred + dec) / MB:.0f} MiB")
    for mode, r in res["runs"].items():
        above = r["peak"] - r["after_imports"]
        r["above_imports"] = above
        r["fraction_of_decoder"] = above / dec
        print(f"{mode:>6}: after imports {r['after_imports'] / MB:.0f} MiB, peak {r['peak'] / MB:.0f} MiB, "
              f"peak - imports {above / MB:.0f} MiB = {100 * above / dec:.1f}% of the decoder weights "
              f"({r['seconds']:.0f} s)")
    s = res["runs"]["stream"]["fraction_of_decoder"]
    print(f"goal (streaming peak - imports <= 25% of decoder weights): {'met' if s <= 0.25 else 'NOT met'} ({100 * s:.1f}%)")
    (out / "bench_memory.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
