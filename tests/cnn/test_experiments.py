"""The CNN sweeps (cnn/experiments.py): tiny end-to-end runs of the magnitude / FW / FW + momentum
sweep and of the engine sweep (need the MNIST files), worker processes equal to one process, and
the dense-checkpoint cache keyed by the training threads per process."""
import json

import torch


def test_quick_config_smoke(tmp_path, mnist, sweep_config):
    from cnn.experiments import run_sweep
    cfg = sweep_config("configs/cnn_mnist_quick.yaml")
    cfg["prune"].update(subsample=32, fw_iterations=2, ramp_steps=2, ramp_iterations=1)
    cfg["latency"] = {"examples": 3, "repeats": 1}
    cfg["main"]["budgets"] = [1]
    cfg["ablations"]["variants"] = {"fw_momentum_mu0": {"momentum": 0.0}}
    cfg["sparsity_sweep"].update(budget=1, sparsities=[0.7], methods=["fw_momentum"])
    cfg["fashion"] = None
    s = run_sweep(cfg, tmp_path / "out", progress=False)
    runs = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 3 + 1 + 1
    for r in runs:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["nonzero_prunable"] <= 1 - r["sparsity"] + 1e-3
    assert (tmp_path / "out" / "fig1_accuracy_loss_vs_budget.png").exists()
    assert s["acceptance"]["dense_1epoch_accuracy"] is not None
    # resuming does not redo finished runs
    run_sweep(cfg, tmp_path / "out", progress=False)
    assert len((tmp_path / "out" / "runs.jsonl").read_text().splitlines()) == 5


def test_engine_quick_config_smoke(tmp_path, mnist, sweep_config):
    from cnn.experiments import run_sweep
    cfg = sweep_config("configs/cnn_engine_quick.yaml")
    cfg["prune"].update(subsample=32, fw_iterations=2, ramp_iterations=2, calib_samples=64,
                        layerwise={"iterations": 5, "swaps": 2})
    cfg["engine"]["sparsities"] = [0.9]
    s = run_sweep(cfg, tmp_path / "out", progress=False)
    runs = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert {r["method"] for r in runs} == set(cfg["engine"]["variants"])
    nz = {r["method"]: r["nonzero_prunable"] for r in runs}
    assert len(set(round(v, 9) for v in nz.values())) == 1          # same kept count for every variant
    for r in runs:
        assert 0.0 <= r["accuracy_noft"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
    assert len([r for r in runs if r.get("layers")]) == 3
    assert (tmp_path / "out" / "fig6_engine.png").exists()
    assert "engine_90pct_budget2_magnitude_ft" not in s["acceptance"]   # budget 1 only here
    assert "Engine on the CNN" in (tmp_path / "out" / "tables.md").read_text()


def test_two_worker_processes_give_the_sequential_rows(tmp_path, mnist, sweep_config):
    from cnn.experiments import run_sweep
    cfg = sweep_config("configs/cnn_engine_quick.yaml")
    cfg["prune"].update(subsample=32, fw_iterations=2, ramp_iterations=2, calib_samples=64,
                        layerwise={"iterations": 5, "swaps": 2})
    cfg["engine"].update(sparsities=[0.9], seeds=[0, 1], variants={
        "magnitude": {}, "fw_warm": {"method": "fw", "init": "magnitude", "alpha": 0.5, "per_layer": True},
        "lw_sparsefw_rec": {"method": "layerwise", "layerwise_method": "sparsefw+rec"}})
    rows = {}
    for workers in (1, 2):   # one thread per process either way: the same arithmetic
        c = {**cfg, "threads": 1, "workers": workers, "ckpt_dir": str(tmp_path / f"ckpt{workers}")}
        run_sweep(c, tmp_path / f"out{workers}", progress=False)
        lines = (tmp_path / f"out{workers}" / "runs.jsonl").read_text().splitlines()
        rows[workers] = {r["key"]: r for r in map(json.loads, lines)}
    assert len(rows[1]) == 6 and rows[1].keys() == rows[2].keys()
    for k, r in rows[1].items():   # dense training and every run repeated exactly in the workers
        for m in ("dense_accuracy", "accuracy_noft", "accuracy", "loss", "nonzero_prunable",
                  "overlap_with_magnitude"):
            assert rows[2][k][m] == r[m], (k, m)


def test_dense_cache_is_keyed_by_the_training_thread_count(tmp_path, monkeypatch):
    """1- and 2-thread training sum in another order (different 10-epoch models), so they must not
    share cached checkpoints; the parent of a worker pool must find the workers' checkpoints
    (``threads // workers`` threads per process). Through dense_checkpoints, on random
    MNIST-shaped data (no MNIST files needed)."""
    import cnn.experiments as ex

    g = torch.Generator().manual_seed(0)
    data = (torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g),
            torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))
    monkeypatch.setattr(ex, "get_data", lambda name, cfg: data)
    base = {"dense": {"lr": 0.05, "momentum": 0.9, "batch_size": 32}, "ckpt_dir": str(tmp_path)}

    def cached(**kw) -> list[int]:
        """The epochs a config finds in the cache (training nothing)."""
        return sorted(ex.dense_checkpoints("mnist", 0, 1, {**base, **kw}, train_missing=False))

    worker = {**base, "threads": 2, "workers": 2}                 # a worker of a pool: 1 thread
    assert sorted(ex.dense_checkpoints("mnist", 0, 1, worker)) == [1]
    assert cached(threads=2, workers=2) == [1]                  # the pool's parent finds its workers' checkpoint
    assert cached(threads=1) == [1] and cached(threads=1, workers=2) == [1]   # 1 thread per process too
    assert cached(threads=2) == [] and cached(threads=4, workers=2) == []     # 2 threads: another model
    ex.dense_checkpoints("mnist", 0, 1, {**base, "threads": 2})
    assert cached(threads=4, workers=2) == [1]
    kept = sorted(p.name for p in tmp_path.iterdir() if any(p.iterdir()))   # folders holding checkpoints
    assert len(kept) == 2 and kept[0].endswith("_t1") and kept[1].endswith("_t2")
