"""The SFW-pruning experiment script (cnn/sfw_experiments.py): global masks, a tiny end-to-end run
(needs the MNIST files), and a bad config as one error line with exit 2."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sparsefw.errors import SparseFWError


def test_global_magnitude_masks_are_global():
    from cnn.sfw_experiments import apply_masks, global_masks
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[10.0, -0.1], [0.2, 5.0]]))
        m[1].weight.copy_(torch.tensor([[0.3, -7.0], [0.05, 0.4], [-6.0, 1.0]]))
    masks = global_masks(m, 0.4)                                 # keep round(0.4 * 10) = 4
    assert masks["0.weight"].tolist() == [[True, False], [False, True]]
    assert masks["1.weight"].tolist() == [[False, True], [False, False], [True, False]]
    assert "0.bias" not in masks
    r = global_masks(m, 0.5, "random", torch.Generator().manual_seed(0))
    assert sum(int(v.sum()) for v in r.values()) == 5
    apply_masks(m, masks)
    assert int((m[1].weight != 0).sum()) == 2
    with pytest.raises(SparseFWError):
        global_masks(m, 0.0)


def test_smoke_experiment_runs(tmp_path, mnist):
    from cnn.sfw_experiments import run
    cfg = {"seed": 0, "threads": 1, "out_dir": str(tmp_path), "datasets": ["mnist"],
           "models": ["mlp"], "methods": ["sgd", "sfw", "sfw_init"], "train_subset": 1500,
           "batch_size": 100, "epochs": {"mlp": 1}, "keep_ratios": [1.0, 0.1],
           "sgd": {"lr": 0.05, "momentum": 0.9}, "sfw": {"lr": 1.0, "momentum": 0.9, "k_frac": 0.05,
                                                        "tau": 15},
           "sfw_init": {"iters": 3}, "finetune": {"epochs": 1, "lr": 0.01},
           "ablation": {"dataset": "mnist", "model": "mlp", "epochs": 1, "k_fracs": [0.05],
                        "taus": [5]}}
    res = run(cfg)
    js = json.loads((tmp_path / "results.json").read_text())
    runs = js["settings"][0]["runs"]
    assert set(runs) == {"sgd", "sfw", "sfw_init"}
    assert runs["sfw"]["feasible"] and runs["sfw_init"]["feasible"]
    assert runs["sfw"]["magnitude"]["1.0"] > 50.0 and runs["sgd"]["magnitude"]["1.0"] > 50.0
    assert {"random", "finetune"} <= set(runs["sgd"])
    for f in ("weight_histograms.png", "accuracy_vs_pruning.png", "ablation.png", "pruning.csv",
              "ablation.csv"):
        assert (tmp_path / f).exists()
    assert len(res["ablation"]) == 1


def test_experiment_bad_config_is_one_error_line_exit_2(tmp_path, capsys):
    from cnn.sfw_experiments import main

    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: config file") and "missing.yaml" in err[0]
