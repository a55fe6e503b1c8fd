"""SFW-pruning experiments (Lu et al., ICLR 2022): train once under K-sparse polytope constraints
with stochastic Frank-Wolfe, then one-shot global magnitude pruning to any keep ratio, no retraining.

    python -m cnn.sfw_experiments --config configs/cnn_sfw.yaml
    python -m cnn.sfw_experiments --config configs/cnn_sfw_quick.yaml

For every (dataset, model) setting it trains SGD, SFW and SFW + SFW-Init for the same epochs and
evaluates test accuracy after global magnitude pruning at each keep ratio; SGD is also pruned at
random and pruned + fine-tuned (the "retraining" reference). An ablation over k_frac x tau runs on
one setting. Writes ``results.json``, ``pruning.csv``, ``ablation.csv`` and figures (weight
histograms, accuracy vs keep ratio, ablation) to the config's ``out_dir``; see cnn/SFW.md.
"""
from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from cnn.data import load_split
from cnn.models import MLP, PaperCNN, prunable_parameters
from sparsefw.config import load_yaml
from sparsefw.errors import SparseFWError
from sparsefw.masks import Pattern, select
from cnn.sfw import SFW, SFWSchedule, ksparse_param_groups, sfw_init

MODELS = {"cnn": PaperCNN, "mlp": MLP}


# ----------------------------------------------------------------------------------------------
# Pruning (global, one-shot)
# ----------------------------------------------------------------------------------------------
def global_masks(model: nn.Module, keep: float, method: str = "magnitude",
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One-shot global masks over all prunable weights (conv + linear weights; biases stay dense).

    The scores of all tensors are concatenated into one (1, N) row and the top round(keep * N)
    are kept with :func:`sparsefw.masks.select` (``Pattern("unstructured", 1 - keep)``).

    Args: model; keep: kept fraction in (0, 1]; method: "magnitude" (|W|) or "random"
        (uniform scores from ``generator``).
    Returns: {param name: bool mask of the tensor's shape, True = kept}.
    Raises: SparseFWError: keep outside (0, 1] or an unknown method.
    """
    if not (0.0 < keep <= 1.0):
        raise SparseFWError(f"keep ratio must be in (0, 1], got {keep}")
    params = prunable_parameters(model)
    if method == "magnitude":
        scores = torch.cat([p.detach().abs().reshape(-1).float() for p in params.values()])
    elif method == "random":
        n = sum(p.numel() for p in params.values())
        scores = torch.rand(n, generator=generator)
    else:
        raise SparseFWError(f"unknown pruning method '{method}': use 'magnitude' or 'random'")
    flat = select(scores.view(1, -1), Pattern("unstructured", 1.0 - keep)).view(-1)
    out, i = {}, 0
    for n, p in params.items():
        out[n] = flat[i:i + p.numel()].view_as(p)
        i += p.numel()
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place (W <- W ⊙ M)."""
    params = dict(model.named_parameters())
    for n, m in masks.items():
        params[n].mul_(m.to(params[n].dtype))


# ----------------------------------------------------------------------------------------------
# Training / evaluation loops (small, local; BN-free models)
# ----------------------------------------------------------------------------------------------
def batches(x: torch.Tensor, y: torch.Tensor, bs: int, gen: torch.Generator):
    """One shuffled epoch of (x, y) minibatches of size ``bs``."""
    perm = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), bs):
        idx = perm[i:i + bs]
        yield x[idx], y[idx]


def endless(x, y, bs, gen):
    """Endless stream of shuffled minibatches (for SFW-Init)."""
    while True:
        yield from batches(x, y, bs, gen)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 2000) -> float:
    """Top-1 accuracy in percent on (x, y)."""
    model.eval()
    correct = 0
    for i in range(0, len(x), bs):
        correct += int((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum())
    return 100.0 * correct / len(x)


def train(model, opt, sched, data, epochs, bs, gen, desc, masks=None, max_batches=None):
    """Train for ``epochs``; returns per-epoch {loss, lr, seconds}. ``masks`` re-zeroes pruned
    weights after every step (fine-tuning); ``max_batches`` caps the batches per epoch."""
    xtr, ytr = data
    log = []
    for ep in range(epochs):
        model.train()
        t0, tot, nb = time.perf_counter(), 0.0, 0
        nbat = math.ceil(len(xtr) / bs) if max_batches is None else min(max_batches, math.ceil(len(xtr) / bs))
        for xb, yb in tqdm(itertools.islice(batches(xtr, ytr, bs, gen), nbat), total=nbat,
                           desc=f"{desc} ep{ep + 1}/{epochs}", leave=False, mininterval=5):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            if masks is not None:
                apply_masks(model, masks)
            tot += loss.item()
            nb += 1
        lr = opt.param_groups[0]["lr"]
        mean = tot / max(nb, 1)
        if sched is not None:
            sched.epoch_end(mean)
        log.append({"epoch": ep + 1, "loss": mean, "lr": lr, "seconds": time.perf_counter() - t0})
    return log


def milestones(c, epochs):
    """Step-decay epochs from ``decay_fracs`` (fractions of the run, e.g. [0.7])."""
    return sorted({max(1, round(f * epochs)) for f in c.get("decay_fracs", ())})


def make_sgd(model, c, epochs):
    """SGD baseline: ``torch.optim.SGD`` (lr, momentum, weight decay from ``c``) with the same
    step-decay schedule as SFW at ``milestones(c, epochs)`` (factor ``gamma``, default 0.1).

    Returns ``(optimizer, SFWSchedule)``; ``schedule.step()`` once per epoch.
    """
    opt = torch.optim.SGD(model.parameters(), lr=c["lr"], momentum=c["momentum"],
                          weight_decay=c.get("weight_decay", 0.0))
    return opt, SFWSchedule(opt, milestones(c, epochs), c.get("gamma", 0.1), dynamic=False)


def make_sfw(model, c, epochs, k_frac=None, tau=None):
    """Stochastic Frank-Wolfe under K-sparse polytope constraints (Lu et al., ICLR 2022, Alg. 1;
    Pokutta et al. 2020, Alg. 1).

    Every parameter tensor (weights and biases) gets its own K-sparse polytope:
    K = max(``k_min``, ``k_frac`` × numel), radius τ·E‖θ₀‖₂/√K (``ksparse_param_groups``);
    ``k_frac`` / ``tau`` override the config's values (the ablation grid). The learning rate
    decays at ``milestones(c, epochs)``; with ``dynamic`` (default) also by Pokutta et al.'s
    ×0.7 / ×1.06 rule on the 5- vs 10-epoch mean training loss.

    Returns ``(SFW optimizer, SFWSchedule, param groups)``. Raises ``SparseFWError`` (from
    ``ksparse_param_groups``) for a bad k_frac, k_min or τ.
    """
    groups = ksparse_param_groups(model, k_frac=c["k_frac"] if k_frac is None else k_frac,
                                  k_min=c.get("k_min", 1), tau=c["tau"] if tau is None else tau)
    opt = SFW(groups, lr=c["lr"], momentum=c["momentum"], rescale=c.get("rescale", "gradient"))
    sched = SFWSchedule(opt, milestones(c, epochs), c.get("gamma", 0.1),
                        dynamic=c.get("dynamic", True))
    return opt, sched, groups


def prune_curve(model, keeps, test, method="magnitude", gen=None):
    """Accuracy (%) after one-shot global pruning at each keep ratio (no retraining)."""
    accs = {}
    for k in keeps:
        m = copy.deepcopy(model)
        apply_masks(m, global_masks(m, k, method, gen))
        accs[k] = evaluate(m, *test)
    return accs


def weight_magnitudes(model) -> torch.Tensor:
    """|W| of all prunable weights, flattened (float32)."""
    return torch.cat([p.detach().abs().reshape(-1) for p in prunable_parameters(model).values()])


# ----------------------------------------------------------------------------------------------
# Experiment driver
# ----------------------------------------------------------------------------------------------
def load_data(name, subset, seed):
    """Train and test split of ``name`` (``mnist``, ``fashion-mnist``; offline packages, see
    ``cnn.data.load_split``), normalised with the training mean and std.

    ``subset``: keep that many training images (a seeded random subset), or all when falsy.
    Returns ``((x_train, y_train), (x_test, y_test))``: x float32 (N, 1, 28, 28), y int64 (N,).
    """
    xtr, ytr = load_split(name, "train")
    xte, yte = load_split(name, "test")
    if subset:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(xtr), generator=g)[:int(subset)]
        xtr, ytr = xtr[idx], ytr[idx]
    # standard MNIST-style normalization (same for every method)
    mu, sd = xtr.mean(), xtr.std()
    return ((xtr - mu) / sd, ytr), ((xte - mu) / sd, yte)


def run_setting(ds, arch, cfg, data, test, out, on_method=lambda res: None):
    """SGD, SFW, SFW+Init (+ baselines) for one dataset/model. Returns a result dict;
    ``on_method(partial_result)`` is called after each method (for incremental saving)."""
    seed, bs, E, keeps = cfg["seed"], cfg["batch_size"], cfg["epochs"][arch], cfg["keep_ratios"]
    res = {"dataset": ds, "model": arch, "runs": {}}
    models = {}
    for method in cfg.get("methods", ["sgd", "sfw", "sfw_init"]):
        torch.manual_seed(seed)
        model = MODELS[arch]()
        gen = torch.Generator().manual_seed(seed + 1)
        t0 = time.perf_counter()
        info = {}
        if method == "sgd":
            opt, sched = make_sgd(model, cfg["sgd"], E)
        else:
            opt, sched, groups = make_sfw(model, cfg["sfw"], E)
            opt.make_feasible()
            if method == "sfw_init":
                ic = cfg["sfw_init"]
                info = sfw_init(model, groups, endless(*data, ic.get("batch_size", bs) // 2, gen),
                                lr=cfg["sfw"]["lr"], iters=ic["iters"], adam_lr=ic.get("adam_lr", 1e-3),
                                min_scale=ic.get("min_scale", 0.01), grad_clip=ic.get("grad_clip", 1.0))
                info["seconds"] = time.perf_counter() - t0
        log = train(model, opt, sched, data, E, bs, gen, f"{ds}/{arch}/{method}")
        run = {"epochs": log, "train_seconds": time.perf_counter() - t0, "init": info,
               "magnitude": prune_curve(model, keeps, test)}
        if method != "sgd":
            run["feasible"] = opt.is_feasible(rtol=1e-4)
        if method == "sgd":
            g = torch.Generator().manual_seed(seed + 2)
            run["random"] = prune_curve(model, keeps, test, "random", g)
            ft = cfg["finetune"]
            run["finetune"] = {}
            for k in keeps:
                m = copy.deepcopy(model)
                masks = global_masks(m, k)
                apply_masks(m, masks)
                if k < 1.0 and ft["epochs"] > 0:
                    o = torch.optim.SGD(m.parameters(), lr=ft["lr"], momentum=0.9)
                    train(m, o, None, data, ft["epochs"], bs, gen, f"finetune keep={k}", masks,
                          ft.get("max_batches"))
                run["finetune"][k] = evaluate(m, *test)
        res["runs"][method] = run
        models[method] = model
        print(f"  {ds}/{arch}/{method}: {len(log)} epochs in {run['train_seconds']:.0f}s "
              f"({sum(e['seconds'] for e in log) / max(len(log), 1):.1f}s/epoch), "
              f"acc {run['magnitude'][1.0]:.2f}%, keep 5%: {run['magnitude'].get(0.05, float('nan')):.2f}%")
        on_method(res)
    if "sgd" in models and "sfw" in models:
        res["hist"] = {m: weight_magnitudes(models[m]) for m in ("sgd", "sfw")}
    return res


def run_ablation(cfg, data_cache, out, over=lambda: False, skipped=None):
    """The SFW ablation over K (``k_fracs``) and τ (``taus``) of the config's ``ablation`` block
    (Lu et al., ICLR 2022, ablation of K and τ): train with SFW per grid point, then one-shot global
    magnitude pruning at every keep ratio without retraining.

    Stops starting new points once ``over()`` is true (their names go to ``skipped``).
    Returns one row per point: ``k_frac``, ``tau``, ``seconds`` (training wall time) and
    ``keep_<ratio>``: test accuracy (%) after pruning to that keep ratio.
    """
    a = cfg["ablation"]
    data, test = data_cache[a["dataset"]]
    seed, bs, keeps = cfg["seed"], cfg["batch_size"], cfg["keep_ratios"]
    if a.get("train_subset"):
        idx = torch.randperm(len(data[0]), generator=torch.Generator().manual_seed(seed))
        data = (data[0][idx[:int(a["train_subset"])]], data[1][idx[:int(a["train_subset"])]])
    rows = []
    grid = [(kf, t) for kf in a["k_fracs"] for t in a["taus"]]
    for kf, tau in tqdm(grid, desc="ablation", mininterval=2):
        if over():
            if skipped is not None:
                skipped.append(f"ablation k_frac={kf} tau={tau}")
            continue
        torch.manual_seed(seed)
        model = MODELS[a["model"]]()
        gen = torch.Generator().manual_seed(seed + 1)
        opt, sched, _ = make_sfw(model, cfg["sfw"], a["epochs"], k_frac=kf, tau=tau)
        opt.make_feasible()
        t0 = time.perf_counter()
        train(model, opt, sched, data, a["epochs"], bs, gen, f"abl k={kf} tau={tau}")
        curve = prune_curve(model, keeps, test)
        rows.append({"k_frac": kf, "tau": tau, "seconds": time.perf_counter() - t0,
                     **{f"keep_{k}": v for k, v in curve.items()}})
    return rows


def plot_all(results, ablation, cfg, out):
    """Write the PNG figures to ``out``: ``weight_histograms.png`` (SGD vs SFW weights, paper
    Fig. 1), ``accuracy_vs_pruning.png`` (accuracy vs pruning ratio per setting, Fig. 2) and, with
    an ablation, ``ablation.png`` (one curve per (K, τ))."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keeps = cfg["keep_ratios"]
    settings = results["settings"]
    # histograms (paper Fig. 1)
    hs = [s for s in settings if "hist" in s]
    if hs:
        fig, axes = plt.subplots(1, len(hs), figsize=(4.2 * len(hs), 3.2), squeeze=False)
        for ax, s in zip(axes[0], hs):
            for m, col in (("sgd", "tab:blue"), ("sfw", "tab:red")):
                w = s["hist"][m]
                w = w / w.max()
                ax.hist(w.numpy(), bins=60, alpha=0.6, color=col, label=m.upper(), log=True)
            ax.set_title(f"{s['dataset']} / {s['model']}")
            ax.set_xlabel("|w| / max|w|")
        axes[0][0].set_ylabel("count (log)")
        axes[0][0].legend()
        fig.tight_layout()
        fig.savefig(out / "weight_histograms.png", dpi=110)
        plt.close(fig)
    # accuracy vs keep ratio (paper Fig. 2)
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.4), squeeze=False)
    for ax, s in zip(axes[0], settings):
        r = s["runs"]
        curves = []
        if "sfw" in r:
            curves.append(("SFW + magnitude", r["sfw"]["magnitude"], "tab:red", "-"))
        if "sfw_init" in r:
            curves.append(("SFW-Init + magnitude", r["sfw_init"]["magnitude"], "tab:orange", "-"))
        if "sgd" in r:
            curves += [("SGD + magnitude", r["sgd"]["magnitude"], "tab:blue", "-"),
                       ("SGD + random", r["sgd"]["random"], "tab:gray", ":"),
                       ("SGD + magn. + fine-tune", r["sgd"]["finetune"], "tab:green", "--")]
        for lab, c, col, ls in curves:
            ax.plot([1 - k for k in keeps], [c[k] for k in keeps], marker="o", ms=3, color=col,
                    ls=ls, label=lab)
        ax.set_title(f"{s['dataset']} / {s['model']}")
        ax.set_xlabel("pruning ratio (fraction removed)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_pruning.png", dpi=110)
    plt.close(fig)
    if ablation:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for row in ablation:
            ax.plot([1 - k for k in keeps], [row[f"keep_{k}"] for k in keeps], marker="o", ms=3,
                    label=f"K={row['k_frac']:.0%}, tau={row['tau']:g}")
        a = cfg["ablation"]
        ax.set_title(f"SFW ablation ({a['dataset']} / {a['model']}, {a['epochs']} ep)")
        ax.set_xlabel("pruning ratio (fraction removed)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "ablation.png", dpi=110)
        plt.close(fig)


def write_csv(results, ablation, cfg, out):
    """Write ``pruning.csv`` (one row per dataset / model / method, accuracy % per keep ratio)
    and, with an ablation, ``ablation.csv`` (the rows of :func:`run_ablation`) to ``out``."""
    keeps = cfg["keep_ratios"]
    with open(out / "pruning.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "model", "method"] + [f"keep_{k}" for k in keeps])
        for s in results["settings"]:
            for m, r in s["runs"].items():
                w.writerow([s["dataset"], s["model"], f"{m}+magnitude"] + [f"{r['magnitude'][k]:.2f}" for k in keeps])
                for extra in ("random", "finetune"):
                    if extra in r:
                        w.writerow([s["dataset"], s["model"], f"{m}+{extra}"] + [f"{r[extra][k]:.2f}" for k in keeps])
    if ablation:
        with open(out / "ablation.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(ablation[0].keys()))
            w.writeheader()
            for row in ablation:
                w.writerow({k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in row.items()})


def _save(results, cfg, out):
    """Write results.json, the CSVs and the figures for what has finished so far."""
    plot_all(results, results["ablation"], cfg, out)
    write_csv(results, results["ablation"], cfg, out)
    js = copy.deepcopy({**results, "settings": [{k: v for k, v in s.items() if k != "hist"}
                                                for s in results["settings"]]})
    for s in js["settings"]:
        for r in s["runs"].values():
            for key in ("magnitude", "random", "finetune"):
                if key in r:
                    r[key] = {str(k): v for k, v in r[key].items()}
    (out / "results.json").write_text(json.dumps(js, indent=1))


def run(cfg: dict, max_minutes: float | None = None) -> dict:
    """Run the whole experiment described by ``cfg`` (the parsed YAML). Results, CSVs and figures
    are (re)written to ``<out_dir>`` after every setting, so a partial run leaves usable output.
    ``max_minutes``: start no new setting / ablation run after this many minutes (listed under
    "skipped"). Returns the result dict."""
    torch.set_num_threads(int(cfg.get("threads", 1)))
    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cfg["keep_ratios"] = [float(k) for k in cfg["keep_ratios"]]

    def over():
        return max_minutes is not None and time.perf_counter() - t_start > 60 * max_minutes

    data_cache = {}
    needed = set(cfg["datasets"]) | ({cfg["ablation"]["dataset"]} if cfg.get("ablation") else set())
    for ds in needed:
        data_cache[ds] = load_data(ds, cfg.get("train_subset"), cfg["seed"])
    results = {"config": cfg, "settings": [], "ablation": [], "skipped": [],
               "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    for ds in cfg["datasets"]:
        for arch in cfg["models"]:
            if over():
                results["skipped"].append(f"{ds}/{arch}")
                continue
            print(f"== {ds} / {arch}")

            def partial(res):
                results["wall_seconds"] = time.perf_counter() - t_start
                _save({**results, "settings": results["settings"] + [res]}, cfg, out)

            results["settings"].append(run_setting(ds, arch, cfg, *data_cache[ds], out, partial))
            results["wall_seconds"] = time.perf_counter() - t_start
            _save(results, cfg, out)
    if cfg.get("ablation"):
        if over():
            results["skipped"].append("ablation")
        else:
            results["ablation"] = run_ablation(cfg, data_cache, out, over, results["skipped"])
    results["wall_seconds"] = time.perf_counter() - t_start
    _save(results, cfg, out)
    print_summary(results, cfg)
    return results


def print_summary(results, cfg):
    """Print the accuracy (%) per keep ratio of every setting and the ablation rows (stdout)."""
    keeps = cfg["keep_ratios"]
    print("\n=== one-shot global magnitude pruning, test accuracy (%) by keep ratio ===")
    print(f"{'setting':28s}" + "".join(f"{k:>7.2f}" for k in keeps))
    for s in results["settings"]:
        for m, r in s["runs"].items():
            for key in ("magnitude", "random", "finetune"):
                if key in r:
                    print(f"{s['dataset'][:7] + '/' + s['model'] + ' ' + m + '+' + key[:5]:28s}"
                          + "".join(f"{r[key][k]:7.2f}" for k in keeps))
    if results["ablation"]:
        print("--- ablation (SFW, k_frac x tau) ---")
        for row in results["ablation"]:
            print(f"k={row['k_frac']:<5} tau={row['tau']:<4}" + "".join(f"{row[f'keep_{k}']:7.2f}" for k in keeps))
    if results["skipped"]:
        print(f"skipped (time limit): {', '.join(results['skipped'])}")
    print(f"wall time {results['wall_seconds']:.0f} s on {results['threads']} thread(s); "
          f"results in {cfg['out_dir']}")


def main(argv=None):
    """``python -m cnn.sfw_experiments --config configs/cnn_sfw.yaml``: run the SFW-pruning
    experiments. Returns the exit code (2 with one ``error:`` line on a bad config)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="YAML config, e.g. configs/cnn_sfw.yaml")
    ap.add_argument("--out-dir", help="override the config's out_dir")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no new run after this many minutes (partial results are kept)")
    a = ap.parse_args(argv)
    try:
        cfg = load_yaml(a.config, example="configs/cnn_sfw.yaml")
        if a.out_dir:
            cfg["out_dir"] = a.out_dir
        run(cfg, a.max_minutes)
    except SparseFWError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
