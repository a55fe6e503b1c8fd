"""The MNIST pruning study of arXiv 2512.01147 over dense pre-training budgets (experiment script).

    python -m cnn.experiments --config configs/cnn_mnist.yaml        # full sweep
    python -m cnn.experiments --config configs/cnn_mnist_quick.yaml  # a few minutes

Steps: (1) train the dense PaperCNN per dataset and seed, saving one checkpoint per epoch
(cached under ``<cache>/cnn_ckpt``); (2) for every section of the config (main sweep over
budgets, ablations, sparsity sweep, Fashion-MNIST) prune each checkpoint independently with each
method and fine-tune with the mask fixed; (3) write ``runs.jsonl`` (appended as runs finish, so
an interrupted sweep resumes), ``results.csv``, ``summary.json`` and PNG figures to ``out_dir``.

Methods: ``magnitude`` (Algorithm 2), ``fw`` (Algorithm 3), ``fw_momentum`` (Algorithm 4); see
cnn/fw_pruning.py. All methods get the same number of fine-tuning steps in total (FW + momentum
spreads them over the levels of its ramp) and FW/FW + momentum the same number of gradient
evaluations (``fw_iterations`` = ``ramp_steps * ramp_iterations`` by default).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sparsefw.config import load_yaml
from sparsefw.errors import SparseFWError
from sparsefw.paths import cache_dir

from . import fw_pruning as fwp
from .data import load_split
from .models import PaperCNN, prunable_parameters
from .train import (apply_masks, channels_last, effective_weight_gradient, evaluate, nonzero_fractions,
                    per_example_latency, set_threads, train, with_sparse_linear)

METHODS = ("magnitude", "fw", "fw_momentum")
BASES = METHODS + ("layerwise",)      # layerwise: cnn/layerwise.py (the LLM pipeline on the CNN)
SECTIONS = ("main", "ablations", "sparsity_sweep", "fashion", "engine")
METRICS = ("accuracy", "loss", "accuracy_noft", "loss_noft", "nonzero_prunable", "nonzero_all",
           "latency_ratio", "latency_ratio_csr", "prune_seconds")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def load_config(path: str | Path) -> dict:
    """Read a YAML config (see configs/cnn_mnist.yaml). Raises SparseFWError if missing/invalid."""
    return load_yaml(path, required=("dense", "finetune", "prune"), example="configs/cnn_mnist.yaml")


def plan_runs(cfg: dict) -> list[dict]:
    """Expand the config's sections into a list of pruning runs (dicts with section, dataset,
    budget, seed, method label, base method, sparsity and overrides of the ``prune`` settings).

    Order (a partial sweep is still useful; runs resume from runs.jsonl): the runs matching the
    entries of ``cfg["run_order"]`` (dicts such as ``{section: main, budget: 2}``) first, in that
    order; then the rest in plan order (main with ``main.order`` budgets first, ablations, sparsity
    sweep seed by seed, Fashion-MNIST). Dense checkpoints are trained lazily, only as far as the
    next run needs."""
    runs = []
    s_main = float(cfg["prune"]["sparsity"])
    sec = cfg.get("main")
    if sec:
        order = [b for b in sec.get("order", []) if b in sec["budgets"]]
        for b in order + [b for b in sec["budgets"] if b not in order]:
            for seed in sec["seeds"]:
                for m in sec["methods"]:
                    runs.append(dict(section="main", dataset=sec.get("dataset", "mnist"), budget=b,
                                     seed=seed, method=m, base=m, sparsity=s_main, over={}))
    sec = cfg.get("ablations")
    if sec:
        for b in sec["budgets"]:
            for seed in sec["seeds"]:
                for label, over in sec["variants"].items():
                    over = dict(over)
                    base = over.pop("method", "fw_momentum")
                    runs.append(dict(section="ablations", dataset=sec.get("dataset", "mnist"),
                                     budget=b, seed=seed, method=label, base=base,
                                     sparsity=float(over.pop("sparsity", s_main)), over=over))
    sec = cfg.get("sparsity_sweep")
    if sec:
        for seed in sec["seeds"]:
            for s in sec["sparsities"]:
                for m in sec["methods"]:
                    runs.append(dict(section="sparsity_sweep", dataset=sec.get("dataset", "mnist"),
                                     budget=sec["budget"], seed=seed, method=m, base=m,
                                     sparsity=float(s), over={}))
    sec = cfg.get("fashion")
    if sec:
        for b in sec["budgets"]:
            for seed in sec["seeds"]:
                for m in sec["methods"]:
                    runs.append(dict(section="fashion", dataset=sec.get("dataset", "fashion-mnist"),
                                     budget=b, seed=seed, method=m, base=m, sparsity=s_main, over={}))
    sec = cfg.get("engine")
    if sec:     # the LLM engine's method on the CNN (configs/cnn_engine.yaml)
        for b in sec["budgets"]:
            for sp in sec["sparsities"]:
                for seed in sec["seeds"]:
                    for label, over in sec["variants"].items():
                        over = dict(over or {})
                        base = over.pop("method", label)
                        runs.append(dict(section="engine", dataset=sec.get("dataset", "mnist"), budget=b,
                                         seed=seed, method=label, base=base, sparsity=float(sp), over=over))
    prio = cfg.get("run_order") or []

    def rank(r):
        for i, pr in enumerate(prio):
            if all(r.get(k) == v for k, v in pr.items()):
                return i
        return len(prio)
    runs = sorted(runs, key=rank)  # stable: plan order within a priority class
    for r in runs:
        if r["base"] not in BASES:
            raise SparseFWError(f"unknown pruning method '{r['base']}': use one of {', '.join(BASES)}")
        r["key"] = f"{r['section']}|{r['dataset']}|b{r['budget']}|s{r['seed']}|{r['method']}|{r['sparsity']}"
    return runs


# ----------------------------------------------------------------------------------------------
# Data and dense checkpoints
# ----------------------------------------------------------------------------------------------
_DATA: dict = {}


def get_data(name: str, cfg: dict):
    """(x_train, y_train, x_test, y_test) for a dataset, channels-last, optional subsets."""
    d = cfg.get("data", {}) or {}
    key = (name, d.get("train_subset"), d.get("test_subset"))
    if key not in _DATA:
        x, y = load_split(name, "train")
        xt, yt = load_split(name, "test")
        if d.get("train_subset"):
            idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1234))
            idx = idx[: int(d["train_subset"])]
            x, y = x[idx], y[idx]
        if d.get("test_subset"):
            xt, yt = xt[: int(d["test_subset"])], yt[: int(d["test_subset"])]
        _DATA[key] = (channels_last(x), y, channels_last(xt), yt)
    return _DATA[key]


def new_model(seed: int) -> torch.nn.Module:
    """A freshly initialised PaperCNN (seeded), channels-last."""
    torch.manual_seed(seed)
    return PaperCNN().to(memory_format=torch.channels_last)


def _process_threads(cfg: dict) -> int:
    """Threads of each process that trains or prunes: ``threads`` // ``workers`` (at least 1)."""
    return max(1, int(cfg.get("threads", 1)) // int(cfg.get("workers", 1) or 1))


def _ckpt_dir(name: str, seed: int, cfg: dict) -> Path:
    dn, d = cfg["dense"], cfg.get("data", {}) or {}
    # the training thread count is part of the key: CPU kernels sum in a thread-dependent order,
    # so 1- and 2-thread training drift apart (2e-5 in the weights after 50 steps, other 10-epoch
    # models); with it, a config reproduces its own checkpoints on a fresh machine
    tag = (f"{name}_seed{seed}_lr{dn['lr']}_mom{dn['momentum']}_bs{dn.get('batch_size', 128)}"
           f"_n{d.get('train_subset') or 'all'}_t{_process_threads(cfg)}")
    root = Path(cfg["ckpt_dir"]) if cfg.get("ckpt_dir") else cache_dir() / "cnn_ckpt"
    p = root / tag
    p.mkdir(parents=True, exist_ok=True)
    return p


def dense_checkpoints(name: str, seed: int, epochs: int, cfg: dict,
                      train_missing: bool = True) -> dict[int, dict]:
    """Train (or load from the cache) the dense model, one checkpoint per epoch 1..epochs.

    Returns: epoch -> {"state": state_dict, "accuracy", "loss", "train_seconds"} (test metrics on
    the configured test set). Training continues from the last cached epoch (model, optimizer
    and shuffling RNG state are cached with each checkpoint). With ``train_missing=False`` only
    the cached epochs are returned.
    """
    x, y, xt, yt = get_data(name, cfg)
    dn = cfg["dense"]
    d = _ckpt_dir(name, seed, cfg)
    have = {}
    for e in range(1, epochs + 1):
        f = d / f"epoch{e}.pt"
        if not f.exists():
            break
        have[e] = torch.load(f, weights_only=False)
    if len(have) < epochs and train_missing:
        last = max(have) if have else 0
        model = new_model(seed)
        opt = torch.optim.SGD(model.parameters(), lr=dn["lr"], momentum=dn["momentum"])
        gen = torch.Generator().manual_seed(10_000 + seed)
        if last:
            model.load_state_dict(have[last]["state"])
            opt.load_state_dict(have[last]["opt"])
            gen.set_state(have[last]["gen"])
        for e in range(last + 1, epochs + 1):
            t0 = time.perf_counter()
            train(model, x, y, epochs=1, batch_size=dn.get("batch_size", 128), generator=gen,
                  optimizer=opt)
            sec = time.perf_counter() - t0
            acc, loss = evaluate(model, xt, yt)
            ck = {"state": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
                  "gen": gen.get_state(), "accuracy": acc, "loss": loss, "train_seconds": sec}
            torch.save(ck, d / f"epoch{e}.pt")
            have[e] = ck
            tqdm.write(f"dense {name} seed {seed} epoch {e}: acc {acc:.4f} loss {loss:.4f} ({sec:.0f} s)")
    return have


# ----------------------------------------------------------------------------------------------
# One pruning run
# ----------------------------------------------------------------------------------------------
def prune_run(run: dict, ckpt: dict, cfg: dict) -> dict:
    """Prune one checkpoint with one method, fine-tune with the mask fixed, measure everything.

    Methods (``run["base"]``): ``magnitude``, ``fw``, ``fw_momentum`` (``init: magnitude`` with
    ``alpha`` = the engine's warmstart, :class:`cnn.fw_pruning.WarmBudget`; ``per_layer: true``
    keeps the magnitude mask's per-layer counts), and ``layerwise`` (:mod:`cnn.layerwise` with
    ``layerwise_method`` sparsefw | sparsefw+rec | sparsegpt on ``calib_samples`` training images,
    each layer keeping the global-magnitude mask's count).

    Returns a flat dict (the row of results.csv): run identifiers, test accuracy (fraction) and
    loss (nats) after fine-tuning and right before the (last) fine-tuning (``*_noft``), nonzero
    fractions, latency ratios vs the dense checkpoint (batch 1, masked dense kernels and with a
    CSR kernel for the dense layer), pruning wall time (s, including fine-tuning), fine-tuning
    steps, gradient evaluations and the mask's overlap with magnitude.
    """
    x, y, xt, yt = get_data(run["dataset"], cfg)
    p = {**cfg["prune"], **run["over"]}
    ft = cfg["finetune"]
    seed, budget = int(run["seed"]), int(run["budget"])
    model = new_model(seed)
    model.load_state_dict(ckpt["state"])
    dense = copy.deepcopy(model).eval()
    weights = prunable_parameters(model)
    n = sum(w.numel() for w in weights.values())
    gen_ft = torch.Generator().manual_seed(100_000 + 100 * seed + budget)
    gen_sub = torch.Generator().manual_seed(200_000 + 100 * seed + budget)
    S = int(p["subsample"])
    total_steps = int(ft["steps"])
    info = {"grad_evals": 0, "overlap_with_magnitude": None}
    t0 = time.perf_counter()

    def finetune(masks: dict, steps: int, last: bool = True) -> None:
        if last:      # accuracy of the pruned network before its (last) fine-tuning
            with torch.no_grad():
                apply_masks(model, masks)
            info["noft"] = evaluate(model, xt, yt)
        train(model, x, y, steps=steps, lr=ft["lr"], momentum=ft["momentum"],
              batch_size=ft.get("batch_size", 128), generator=gen_ft, masks=masks)

    if run["base"] == "magnitude":
        masks = fwp.global_magnitude_mask(weights, run["sparsity"])
        finetune(masks, total_steps)
        info["overlap_with_magnitude"] = 1.0
    elif run["base"] == "layerwise":
        from .layerwise import prune_layerwise
        mag = fwp.global_magnitude_mask(weights, run["sparsity"])
        gen_cal = torch.Generator().manual_seed(300_000 + 100 * seed + budget)
        cal = x[torch.randperm(x.shape[0], generator=gen_cal)[: int(p.get("calib_samples", 1024))]]
        lw = p.get("layerwise", {}) or {}
        masks, layer_info = prune_layerwise(model, cal, {k: int(v.sum()) for k, v in mag.items()},
                                            p.get("layerwise_method", "sparsefw"), **lw)
        info["overlap_with_magnitude"] = sum(int((masks[k] & mag[k]).sum()) for k in mag) / \
            max(sum(int(v.sum()) for v in mag.values()), 1)
        info["layers"] = layer_info
        finetune(masks, total_steps)
    else:
        if run["base"] == "fw":
            schedule = [run["sparsity"]]
            iters = int(p["fw_iterations"])
            mu = float(p.get("fw_momentum_mu", 0.0))
        else:
            steps = int(p["ramp_steps"])
            schedule = fwp.sparsity_schedule(float(p["s_init"]), run["sparsity"], steps,
                                             p.get("ramp", "linear"))
            iters = int(p["ramp_iterations"])
            mu = float(p["momentum"])
        if p.get("finetune_per_level", "split") == "each":  # the paper: E epochs after every step
            per_level = [total_steps] * len(schedule)
        else:  # equal compute: the same total fine-tuning steps as magnitude and FW
            per_level = [total_steps // len(schedule)] * len(schedule)
            per_level[-1] += total_steps - sum(per_level)
        total_steps = sum(per_level)

        # stored weights: pruned weights keep their last value (torch.nn.utils.prune's weight_orig)
        store = {k: v.detach().clone() for k, v in weights.items()}

        def grad_fn(m_flat: torch.Tensor):
            idx = torch.randint(0, x.shape[0], (S,), generator=gen_sub)
            g = effective_weight_gradient(model, fwp.unflatten(m_flat, store), x[idx], y[idx],
                                          weights=store)
            return fwp.flatten(store), fwp.flatten(g)

        def finetune_level(M: torch.Tensor, level: int) -> None:
            masks = {k: v.clone() for k, v in fwp.unflatten(M, weights).items()}
            with torch.no_grad():
                for k, w in weights.items():
                    w.copy_(store[k] * masks[k])
            finetune(masks, per_level[level], last=level == len(schedule) - 1)
            with torch.no_grad():
                for k, w in weights.items():
                    store[k] = torch.where(masks[k], w.detach(), store[k])

        alpha = p.get("alpha")
        sizes = [w.numel() for w in weights.values()] if p.get("per_layer") else None
        res = fwp.fw_prune(grad_fn, finetune_level, n, schedule, iters, mu, p.get("reading", "mask"),
                           p.get("init", "ones"), lambda: fwp.flatten(store),
                           alpha=None if alpha is None else float(alpha), sizes=sizes)
        info["grad_evals"] = res.history[-1]["grad_evals"]
        info["overlap_with_magnitude"] = res.history[0]["overlap_with_magnitude"] if len(res.history) == 1 \
            else res.history[-1]["overlap_with_magnitude"]
    prune_seconds = time.perf_counter() - t0
    acc, loss = evaluate(model, xt, yt)
    nz_p, nz_a = nonzero_fractions(model)
    lat = cfg.get("latency", {}) or {}
    ratio = ratio_csr = None
    if int(lat.get("examples", 0)) > 0:
        t = per_example_latency({"dense": dense, "pruned": model, "csr": with_sparse_linear(model)},
                                xt[: int(lat["examples"])], int(lat.get("repeats", 3)))
        ratio, ratio_csr = t["pruned"] / t["dense"], t["csr"] / t["dense"]
    return {"key": run["key"], "section": run["section"], "dataset": run["dataset"],
            "budget": budget, "seed": seed, "method": run["method"], "base_method": run["base"],
            "sparsity": run["sparsity"], "accuracy": acc, "loss": loss,
            "accuracy_noft": info["noft"][0], "loss_noft": info["noft"][1],
            "nonzero_prunable": nz_p, "nonzero_all": nz_a, "latency_ratio": ratio,
            "latency_ratio_csr": ratio_csr, "prune_seconds": prune_seconds,
            "finetune_steps": total_steps, "grad_evals": info["grad_evals"],
            "overlap_with_magnitude": info["overlap_with_magnitude"],
            "dense_accuracy": ckpt["accuracy"], "dense_loss": ckpt["loss"],
            **({"layers": info["layers"]} if "layers" in info else {})}


# ----------------------------------------------------------------------------------------------
# Aggregation, figures
# ----------------------------------------------------------------------------------------------
def _ms(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(rows: list[dict], dense_rows: list[dict]) -> dict:
    """Mean ± std over seeds per (section, dataset, method, budget, sparsity), plus the dense
    model per (dataset, epoch), plus the acceptance numbers of the issue."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["section"], r["dataset"], r["method"], r["budget"], r["sparsity"]), []).append(r)
    for r in dense_rows:
        groups.setdefault(("dense", r["dataset"], "dense", r["budget"], 0.0), []).append(r)
    out = []
    for (sec, ds, m, b, s), rs in sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        e = {"section": sec, "dataset": ds, "method": m, "budget": b, "sparsity": s, "n": len(rs)}
        for k in METRICS:
            mean, std = _ms([r.get(k) for r in rs])
            e[k + "_mean"], e[k + "_std"] = mean, std
        out.append(e)
    acc = {}

    def find(sec, ds, m, b, s=None):
        for e in out:
            if e["section"] == sec and e["dataset"] == ds and e["method"] == m and e["budget"] == b \
                    and (s is None or abs(e["sparsity"] - s) < 1e-9):
                return e
        return None
    d1, d10 = find("dense", "mnist", "dense", 1), find("dense", "mnist", "dense", 10)
    acc["dense_1epoch_accuracy"] = d1 and d1["accuracy_mean"]
    acc["dense_10epoch_accuracy"] = d10 and d10["accuracy_mean"]
    for m in METHODS:
        e = find("main", "mnist", m, 2)
        acc[f"{m}_90pct_budget2_accuracy"] = e and e["accuracy_mean"]
        acc[f"{m}_90pct_budget2_accuracy_std"] = e and e["accuracy_std"]
    if acc.get("fw_momentum_90pct_budget2_accuracy") is not None and d10:
        acc["fw_momentum_budget2_minus_dense10_points"] = \
            100 * (acc["fw_momentum_90pct_budget2_accuracy"] - d10["accuracy_mean"])
    eng = [e for e in out if e["section"] == "engine" and e["dataset"] == "mnist"]
    if eng:     # the engine sweep's goals, against magnitude + fine-tuning of the same run
        for b, s in ((2, 0.9), (2, 0.98)):
            cell = [e for e in eng if e["budget"] == b and abs(e["sparsity"] - s) < 1e-9]
            mag = next((e for e in cell if e["method"] == "magnitude"), None)
            rest = [e for e in cell if e["method"] != "magnitude" and e["accuracy_mean"] is not None]
            if not (mag and rest):
                continue
            tag = f"engine_{round(100 * s)}pct_budget{b}"
            best_noft = max(rest, key=lambda e: e["accuracy_noft_mean"] or 0)
            best_ft = max(rest, key=lambda e: e["accuracy_mean"])
            acc[f"{tag}_magnitude_ft"] = mag["accuracy_mean"]
            acc[f"{tag}_magnitude_noft"] = mag["accuracy_noft_mean"]
            acc[f"{tag}_best_noft"] = f"{best_noft['method']}: {best_noft['accuracy_noft_mean']:.4f}"
            acc[f"{tag}_best_noft_minus_magnitude_ft_points"] = \
                100 * (best_noft["accuracy_noft_mean"] - mag["accuracy_mean"])
            acc[f"{tag}_best_ft"] = f"{best_ft['method']}: {best_ft['accuracy_mean']:.4f}"
            acc[f"{tag}_best_ft_minus_magnitude_ft_points"] = 100 * (best_ft["accuracy_mean"] - mag["accuracy_mean"])
    return {"groups": out, "acceptance": acc}


def make_figures(summary: dict, out: Path) -> list[str]:
    """PNG figures like the paper's Figures 1-3 (accuracy and loss vs budget, nonzero %,
    normalized inference time; mean ± std over seeds) plus the sparsity sweep and Fashion-MNIST."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    G = summary["groups"]
    files = []
    colors = {"dense": "k", "magnitude": "tab:blue", "fw": "tab:orange", "fw_momentum": "tab:green"}

    def series(sec, ds, m, key):
        es = sorted([e for e in G if e["section"] == sec and e["dataset"] == ds and e["method"] == m
                     and e[key + "_mean"] is not None], key=lambda e: e["budget"])
        return [e["budget"] for e in es], [e[key + "_mean"] for e in es], [e[key + "_std"] for e in es]

    for ds, sec, fname in (("mnist", "main", "fig1_accuracy_loss_vs_budget.png"),
                           ("fashion-mnist", "fashion", "fig5_fashion_accuracy_loss_vs_budget.png")):
        if not any(e["section"] == sec for e in G):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        budgets = sorted({e["budget"] for e in G if e["section"] == sec})
        for ax, key, lab in ((axes[0], "accuracy", "test accuracy (%)"), (axes[1], "loss", "test loss (nats)")):
            for m in ("dense",) + METHODS:
                b, mu, sd = series("dense" if m == "dense" else sec, ds, m, key)
                if m == "dense":
                    keep = [i for i, v in enumerate(b) if v <= max(max(budgets), 10)]
                    b, mu, sd = [b[i] for i in keep], [mu[i] for i in keep], [sd[i] for i in keep]
                if not b:
                    continue
                scale = 100 if key == "accuracy" else 1
                ax.errorbar(b, [v * scale for v in mu], yerr=[v * scale for v in sd], marker="o",
                            capsize=3, label=m, color=colors[m])
            ax.set_xlabel("dense pre-training budget (epochs)")
            ax.set_ylabel(lab)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"{ds}: pruned to 90% sparsity vs dense (mean ± std over seeds)")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(fname)
    if any(e["section"] == "main" for e in G):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in METHODS:
            b, mu, sd = series("main", "mnist", m, "nonzero_prunable")
            ax.errorbar(b, [100 * v for v in mu], yerr=[100 * v for v in sd], marker="o", capsize=3,
                        label=f"{m} (prunable weights)", color=colors[m])
            b, mu, sd = series("main", "mnist", m, "nonzero_all")
            ax.plot(b, [100 * v for v in mu], ls="--", color=colors[m], label=f"{m} (all parameters)")
        ax.axhline(100, color="k", lw=1, label="dense")
        ax.set_xlabel("dense pre-training budget (epochs)")
        ax.set_ylabel("nonzero weights (%)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "fig2_nonzero_vs_budget.png", dpi=110)
        plt.close(fig)
        files.append("fig2_nonzero_vs_budget.png")
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in METHODS:
            b, mu, sd = series("main", "mnist", m, "latency_ratio")
            if b:
                ax.errorbar(b, mu, yerr=sd, marker="o", capsize=3, label=f"{m} (dense kernels)", color=colors[m])
            b, mu, sd = series("main", "mnist", m, "latency_ratio_csr")
            if b:
                ax.errorbar(b, mu, yerr=sd, marker="s", ls="--", capsize=3, label=f"{m} (CSR dense layer)",
                            color=colors[m], alpha=0.6)
        ax.axhline(1.0, color="k", lw=1, label="dense")
        ax.set_xlabel("dense pre-training budget (epochs)")
        ax.set_ylabel("per-example inference time / dense")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "fig3_inference_time_vs_budget.png", dpi=110)
        plt.close(fig)
        files.append("fig3_inference_time_vs_budget.png")
    sw = [e for e in G if e["section"] in ("sparsity_sweep", "main") and e["dataset"] == "mnist"]
    if any(e["section"] == "sparsity_sweep" for e in G):
        bud = next(e["budget"] for e in G if e["section"] == "sparsity_sweep")
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in METHODS:
            es = sorted([e for e in sw if e["method"] == m and e["budget"] == bud], key=lambda e: e["sparsity"])
            if es:
                ax.errorbar([100 * e["sparsity"] for e in es], [100 * e["accuracy_mean"] for e in es],
                            yerr=[100 * e["accuracy_std"] for e in es], marker="o", capsize=3, label=m,
                            color=colors[m])
        d = [e for e in G if e["section"] == "dense" and e["dataset"] == "mnist" and e["budget"] == bud]
        if d:
            ax.axhline(100 * d[0]["accuracy_mean"], color="k", lw=1, label=f"dense ({bud} epochs)")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"MNIST, {bud}-epoch checkpoint")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "fig4_sparsity_sweep.png", dpi=110)
        plt.close(fig)
        files.append("fig4_sparsity_sweep.png")
    eng = [e for e in G if e["section"] == "engine"]
    if eng:
        budgets = sorted({e["budget"] for e in eng})
        labels = list(dict.fromkeys(e["method"] for e in sorted(eng, key=lambda e: e["method"] != "magnitude")))
        cmap = plt.get_cmap("tab10")
        fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False)
        for ax, b in zip(axes[0], budgets):
            for i, m in enumerate(labels):
                es = sorted([e for e in eng if e["budget"] == b and e["method"] == m], key=lambda e: e["sparsity"])
                xs = [100 * e["sparsity"] for e in es]
                for key, ls, suffix in (("accuracy", "-", " + FT"), ("accuracy_noft", "--", "")):
                    if all(e[key + "_mean"] is not None for e in es):
                        ax.errorbar(xs, [100 * e[key + "_mean"] for e in es],
                                    yerr=[100 * e[key + "_std"] for e in es], ls=ls, marker="o", capsize=3,
                                    color=cmap(i), label=m + suffix)
            ax.set_title(f"{b}-epoch checkpoint")
            ax.set_xlabel("sparsity (%)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_ylim(bottom=max(0, ax.get_ylim()[0]))
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=6)
        fig.suptitle("MNIST: the LLM engine on the CNN (dashed: no fine-tuning; solid: 100 steps)")
        fig.tight_layout()
        fig.savefig(out / "fig6_engine.png", dpi=110)
        plt.close(fig)
        files.append("fig6_engine.png")
    return files


def _write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "layers"]   # per-layer: runs.jsonl
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _fmt(v, pct=True):
    return "-" if v is None else (f"{100 * v:.2f}" if pct else f"{v:.3f}")


def markdown_tables(summary: dict) -> str:
    """Markdown tables of the summary (written to ``tables.md``; pasted into cnn/README.md)."""
    G = summary["groups"]
    lines = []

    def cell(e, key, pct=True, nd=2):
        if e is None or e[key + "_mean"] is None:
            return "-"
        f = 100 if pct else 1
        return f"{f * e[key + '_mean']:.{nd}f} ± {f * e[key + '_std']:.{nd}f}"

    def get(sec, ds, m, b, s=None):
        return next((e for e in G if e["section"] == sec and e["dataset"] == ds and e["method"] == m
                     and e["budget"] == b and (s is None or abs(e["sparsity"] - s) < 1e-9)), None)

    for sec, ds in (("main", "mnist"), ("fashion", "fashion-mnist")):
        budgets = sorted({e["budget"] for e in G if e["section"] == sec})
        if not budgets:
            continue
        for key, title, pct, nd in (("accuracy", "test accuracy (%)", True, 2), ("loss", "test loss (nats)", False, 3)):
            lines.append(f"\n**{ds}, {title}, 90% sparsity, mean ± std over seeds**\n")
            lines.append("| method | " + " | ".join(f"{b} ep" for b in budgets) + " |")
            lines.append("|---|" + "---|" * len(budgets))
            for m in ("dense",) + METHODS:
                lines.append(f"| {m} | " + " | ".join(
                    cell(get("dense" if m == "dense" else sec, ds, m, b), key, pct, nd) for b in budgets) + " |")
    budgets = sorted({e["budget"] for e in G if e["section"] == "main"})
    if budgets:
        lines.append("\n**MNIST, nonzero weights (% of prunable / % of all parameters) and per-example "
                     "inference time / dense (masked dense kernels; CSR dense layer), mean over seeds and budgets**\n")
        lines.append("| method | nonzero prunable % | nonzero all % | time / dense | time / dense, CSR | seconds to prune + fine-tune |")
        lines.append("|---|---|---|---|---|---|")
        for m in METHODS:
            es = [get("main", "mnist", m, b) for b in budgets]
            es = [e for e in es if e]

            def avg(key, f=1.0):
                v = [e[key + "_mean"] for e in es if e[key + "_mean"] is not None]
                return f"{f * statistics.fmean(v):.3f}" if v else "-"
            lines.append(f"| {m} | {avg('nonzero_prunable', 100)} | {avg('nonzero_all', 100)} | "
                         f"{avg('latency_ratio')} | {avg('latency_ratio_csr')} | {avg('prune_seconds')} |")
    ab = [e for e in G if e["section"] == "ablations"]
    if ab:
        lines.append("\n**Ablations (MNIST, 90% sparsity), test accuracy (%)**\n")
        lines.append("| variant | budget | accuracy | loss | n |")
        lines.append("|---|---|---|---|---|")
        for b in sorted({e["budget"] for e in ab}):
            for m in METHODS:
                e = get("main", "mnist", m, b)
                if e:
                    lines.append(f"| {m} (main) | {b} | {cell(e, 'accuracy')} | {cell(e, 'loss', False, 3)} | {e['n']} |")
            for e in sorted([e for e in ab if e["budget"] == b], key=lambda e: e["method"]):
                lines.append(f"| {e['method']} | {b} | {cell(e, 'accuracy')} | {cell(e, 'loss', False, 3)} | {e['n']} |")
    sw = [e for e in G if e["section"] == "sparsity_sweep"]
    if sw:
        b = sw[0]["budget"]
        sps = sorted({e["sparsity"] for e in sw} | {float(summary.get("config", {}).get("prune", {}).get("sparsity", 0.9))})
        lines.append(f"\n**Sparsity sweep (MNIST, {b}-epoch checkpoint), test accuracy (%)**\n")
        lines.append("| method | " + " | ".join(f"{100 * s:.0f}%" for s in sps) + " |")
        lines.append("|---|" + "---|" * len(sps))
        for m in METHODS:
            row = []
            for s in sps:
                e = get("sparsity_sweep", "mnist", m, b, s) or get("main", "mnist", m, b, s)
                row.append(cell(e, "accuracy"))
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        d = get("dense", "mnist", "dense", b)
        if d:
            lines.append(f"| dense ({b} ep) | {cell(d, 'accuracy')} (all sparsities) |" + " |" * (len(sps) - 1))
    eng = [e for e in G if e["section"] == "engine"]
    if eng:
        sps = sorted({e["sparsity"] for e in eng})
        labels = list(dict.fromkeys(e["method"] for e in sorted(eng, key=lambda e: e["method"] != "magnitude")))
        for b in sorted({e["budget"] for e in eng}):
            lines.append(f"\n**Engine on the CNN (MNIST, {b}-epoch checkpoint): test accuracy (%) without / with "
                         "fine-tuning, mean ± std over seeds, same per-layer kept counts as global magnitude**\n")
            lines.append("| variant | " + " | ".join(f"{100 * s:.0f}% no FT | {100 * s:.0f}% FT" for s in sps) + " |")
            lines.append("|---|" + "---|---|" * len(sps))
            for m in labels:
                row = []
                for s in sps:
                    e = get("engine", eng[0]["dataset"], m, b, s)
                    row += [cell(e, "accuracy_noft"), cell(e, "accuracy")]
                lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines.append("\n**Acceptance numbers**\n")
    for k, v in summary["acceptance"].items():
        lines.append(f"- {k}: {v if v is None or isinstance(v, str) else round(v, 5)}")
    return "\n".join(lines) + "\n"


def print_summary(summary: dict) -> None:
    """Print the main table (accuracy % per budget and method) and the acceptance numbers."""
    G = summary["groups"]
    for sec, ds in (("main", "mnist"), ("fashion", "fashion-mnist")):
        budgets = sorted({e["budget"] for e in G if e["section"] == sec})
        if not budgets:
            continue
        print(f"\n{ds} test accuracy (%), mean ± std over seeds, 90% sparsity")
        print("method".ljust(14) + "".join(f"b={b}".rjust(15) for b in budgets))
        for m in ("dense",) + METHODS:
            cells = []
            for b in budgets:
                e = next((e for e in G if e["method"] == m and e["dataset"] == ds and e["budget"] == b
                          and e["section"] == ("dense" if m == "dense" else sec)), None)
                cells.append("-" if e is None else f"{100 * e['accuracy_mean']:.2f}±{100 * e['accuracy_std']:.2f}")
            print(m.ljust(14) + "".join(c.rjust(15) for c in cells))
    for e in G:
        if e["section"] in ("ablations", "sparsity_sweep"):
            print(f"{e['section']:15s} b={e['budget']} s={e['sparsity']:.2f} {e['method']:24s} "
                  f"acc {_fmt(e['accuracy_mean'])}±{_fmt(e['accuracy_std'])} (n={e['n']})")
    print("\nacceptance:", json.dumps(summary["acceptance"], indent=1))


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def _worker_init(threads: int) -> None:
    set_threads(threads)


def _checkpoint(ckpts: dict, run: dict, cfg: dict, train_missing: bool = True) -> dict:
    """The dense checkpoint a run prunes, loaded (or trained) once per (dataset, seed) into
    ``ckpts``."""
    k, b = (run["dataset"], run["seed"]), int(run["budget"])
    if b not in ckpts.get(k, {}):
        ckpts[k] = dense_checkpoints(run["dataset"], run["seed"], b, cfg, train_missing=train_missing)
    return ckpts[k][b]


def _dense_task(args: tuple) -> None:
    name, seed, epochs, cfg = args
    dense_checkpoints(name, seed, epochs, cfg)


_WORKER_CKPTS: dict = {}


def _run_task(args: tuple) -> tuple[dict, dict]:
    run, cfg = args   # the parent queues a run only after its dense checkpoints are cached
    return run, prune_run(run, _checkpoint(_WORKER_CKPTS, run, cfg, train_missing=False), cfg)


def _run_parallel(todo: list[dict], need: dict, cfg: dict, workers: int, record) -> None:
    """Run ``todo`` in ``workers`` processes of ``threads // workers`` (at least 1) threads each:
    first the missing dense checkpoints (one (dataset, seed) per task), then the pruning runs in
    any order; ``record(run, row)`` is called in this process as each run finishes (so runs.jsonl
    has one writer). Several single-thread processes use 2 CPU cores better than one process with
    2 threads on this small CNN. Results equal the sequential ones up to float summation order."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = _process_threads(cfg)
    ctx = mp.get_context("spawn")   # no fork of a process whose OpenMP pool already started
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as ex:
        seeds = {(r["dataset"], r["seed"]) for r in todo}
        dense = {ex.submit(_dense_task, (ds, seed, need[(ds, seed)], cfg)): (ds, seed) for ds, seed in seeds}
        pending = set(dense)
        while pending:   # a seed's runs are queued as soon as its dense checkpoints exist
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                res = f.result()
                if f in dense:
                    pending |= {ex.submit(_run_task, (r, cfg)) for r in todo
                                if (r["dataset"], r["seed"]) == dense[f]}
                else:
                    record(*res)


def run_sweep(cfg: dict, out_dir: str | Path | None = None, progress: bool = True,
              report_only: bool = False) -> dict:
    """Run (or resume) the whole sweep of a config and write the outputs.

    Args: cfg: the parsed config. out_dir: overrides ``cfg["out_dir"]``. progress: tqdm bar.
        report_only: train and prune nothing; summarize the finished runs of ``runs.jsonl`` and
            the cached dense checkpoints (for a partial sweep).
    Returns: the summary dict (also written to ``summary.json``).
    """
    out = Path(out_dir or cfg.get("out_dir", "cnn/results"))
    out.mkdir(parents=True, exist_ok=True)
    set_threads(int(cfg.get("threads", 1)))
    t_start = time.perf_counter()
    runs = plan_runs(cfg)
    need: dict = {}
    for r in runs:
        k = (r["dataset"], r["seed"])
        need[k] = max(need.get(k, 0), int(r["budget"]))
    for ds, seeds in (cfg.get("dense_extra") or {}).items():
        for seed, ep in seeds.items():
            need[(ds, int(seed))] = max(need.get((ds, int(seed)), 0), int(ep))
    jsonl = out / "runs.jsonl"
    done = {}
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["key"]] = r
    ckpts: dict = {}
    dense_rows = []
    bar = tqdm(total=len(runs), desc="pruning runs", disable=not progress, file=sys.stdout)
    bar.update(sum(1 for r in runs if r["key"] in done))
    todo = [] if report_only else [r for r in runs if r["key"] not in done]
    workers = int(cfg.get("workers", 1) or 1)
    if workers < 1:
        raise SparseFWError(f"workers must be >= 1, got {workers}")

    def record(r: dict, row: dict) -> None:
        with open(jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        done[r["key"]] = row
        bar.update(1)
        bar.set_postfix_str(f"{r['method']} b{r['budget']} acc {row['accuracy']:.4f}")

    if workers > 1 and todo:
        _run_parallel(todo, need, cfg, workers, record)
    elif todo:
        for r in todo:
            record(r, prune_run(r, _checkpoint(ckpts, r, cfg), cfg))
    bar.close()
    for k in need:  # the dense rows: every cached epoch up to the largest budget needed
        ckpts[k] = dense_checkpoints(k[0], k[1], need[k], cfg, train_missing=False)
        for e, ck in ckpts[k].items():
            dense_rows.append({"section": "dense", "dataset": k[0], "budget": e, "seed": k[1],
                               "method": "dense", "sparsity": 0.0, "accuracy": ck["accuracy"],
                               "loss": ck["loss"], "nonzero_prunable": 1.0, "nonzero_all": 1.0,
                               "latency_ratio": 1.0, "latency_ratio_csr": None,
                               "prune_seconds": None, "train_seconds": ck["train_seconds"]})
    rows = [done[r["key"]] for r in runs if r["key"] in done]
    summary = summarize(rows, dense_rows)
    summary["config"] = cfg
    summary["wall_seconds_this_invocation"] = time.perf_counter() - t_start
    summary["dense_epoch_seconds_mean"] = _ms([r["train_seconds"] for r in dense_rows])[0]
    _write_csv(rows + dense_rows, out / "results.csv")
    summary["figures"] = make_figures(summary, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "tables.md").write_text(markdown_tables(summary))
    if progress:
        print_summary(summary)
        print(f"\nwrote {out}/results.csv, summary.json, runs.jsonl, {', '.join(summary['figures'])}; "
              f"{summary['wall_seconds_this_invocation']:.0f} s")
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m cnn.experiments --config configs/cnn_mnist.yaml`` (or ``cnn_engine.yaml``): run
    the sweep of :func:`run_sweep`. Returns the exit code (2 with one ``error:`` line on bad input)."""
    ap = argparse.ArgumentParser(description="MNIST magnitude / FW / FW+momentum pruning sweep "
                                             "over pre-training budgets (arXiv 2512.01147)")
    ap.add_argument("--config", required=True, help="YAML config, e.g. configs/cnn_mnist.yaml")
    ap.add_argument("--out", default=None, help="output directory (default: the config's out_dir)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: the config's)")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes sharing the threads (default: the config's, else 1)")
    ap.add_argument("--report-only", action="store_true",
                    help="only summarize finished runs (runs.jsonl) and cached dense checkpoints")
    a = ap.parse_args(argv)
    try:
        cfg = load_config(a.config)
        if a.threads:
            cfg["threads"] = a.threads
        if a.workers:
            cfg["workers"] = a.workers
        run_sweep(cfg, a.out, report_only=a.report_only)
    except SparseFWError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
