"""scripts/recover_study.py on a tiny model: a run prunes its mask, recovers, writes its cell (gap
closed, curve, code version) and the table; a second call skips the finished run."""
import json

import yaml


def test_recover_study_tiny(tmp_path, script, save_tiny):
    study = script("recover_study")
    src, _ = save_tiny("llama", name="dense")
    conf = {"model": str(src), "output": str(tmp_path / "out"),
            "prune": {"calib": "wiki", "nsamples": 4, "seqlen": 32, "seed": 0},
            "masks": {"w50": {"method": "wanda", "sparsity": 0.5}},
            "recover": {"calib": "wiki", "nsamples": 8, "seqlen": 16, "batch": 2, "steps": 4, "lr": 1e-2,
                        "warmup": 1, "checkpoint_every": 2},
            "ppl": {"source": "boolq", "seqlen": 32, "chunks": 2, "every": 2},
            "runs": {"w50_all": {"mask": "w50", "train": "all"}}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(conf))
    study.main(["--config", str(cfg)])
    out = tmp_path / "out"
    cell = json.loads((out / "cells" / "w50_all.json").read_text())
    assert cell["steps"] == 4 and cell["tokens"] == 4 * 2 * 16 and cell["code"]
    assert [p[0] for p in cell["curve"]] == [0, 2, 4]
    gap0, gap1 = cell["log_gap_before"], cell["log_gap_after"]
    assert abs(cell["gap_closed"] - (1 - gap1 / gap0)) < 1e-12 if gap0 > 0 else cell["gap_closed"] is None
    assert (out / "masks" / "w50" / "report.json").exists() and (out / "recover_study.png").exists()
    md = (out / "recover_study.md").read_text()
    assert "| w50_all | w50 | all |" in md
    mtime = (out / "cells" / "w50_all.json").stat().st_mtime
    study.main(["--config", str(cfg)])                    # finished: skipped, the same cell
    assert (out / "cells" / "w50_all.json").stat().st_mtime == mtime
    assert "Budget per run: 4 steps." in md
    # the zero-shot section, from per-document shards of before and after (hand-computed: +0.5 on every task)
    conf["zeroshot"] = {"limit": 4, "runs": ["w50_all"]}
    for side, acc in (("before", [0.0, 0.0, 1.0, 0.0]), ("after", [1.0, 1.0, 1.0, 0.0])):
        folder = out / "zeroshot" / f"w50_all_{side}"
        for task in ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"):
            (folder / task).mkdir(parents=True)
            (folder / task / "000000-000004.json").write_text(json.dumps(
                {"first": 0, "end": 4, "n_docs": 4, "metrics": {"acc": acc}}))
        (folder / "report.json").write_text("{}")
    md = study.report(conf, out)
    assert "## Zero-shot, w50_all: after vs before recovery" in md
    assert "| acc | before | +50.0 ± 28.9 |" in md      # differences 1, 1, 0, 0: sd sqrt(1/3), SE sd/2


def test_a_mask_can_be_a_saved_cell_of_a_results_grid(tmp_path, script, save_tiny):
    """``masks: {m: {cell: ID}}`` with ``grid:``: the run recovers the grid cell's saved checkpoint
    (no mask of its own is pruned), records the cell's options, and its zero-shot "before" is the
    grid's own shards; a cell the grid does not save is refused before anything runs."""
    import pytest
    from sparsefw import api

    study = script("recover_study")
    src, _ = save_tiny("llama", name="dense")
    gout, grid = tmp_path / "grid", tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"model": str(src), "output": str(gout), "sparsities": ["0.5"],
                                    "save": ["wanda__0.5"],
                                    "methods": {"wanda": {"method": "wanda"}, "ria": {"method": "ria"}}}))
    (gout / "cells").mkdir(parents=True)
    for label in ("wanda", "ria"):
        (gout / "cells" / f"{label}__0.5.json").write_text(json.dumps(
            {"label": label, "sparsity": "0.5", "method": label, "ppl": 1.0,
             "options": {"method": label, "sparsity": 0.5, "calib": "wiki", "nsamples": 4, "seqlen": 32}}))
    api.prune(str(src), output=str(gout / "models" / "wanda__0.5"), method="wanda", sparsity=0.5, calib="wiki",
              nsamples=4, seqlen=32, eval_ppl=False)
    conf = {"model": str(src), "output": str(tmp_path / "out"), "grid": str(grid),
            "masks": {"w50": {"cell": "wanda__0.5"}, "r50": {"cell": "ria__0.5"}},
            "recover": {"calib": "wiki", "nsamples": 8, "seqlen": 16, "batch": 2, "steps": 2, "lr": 1e-2,
                        "warmup": 1, "checkpoint_every": 2},
            "ppl": {"source": "boolq", "seqlen": 32, "chunks": 2},
            "runs": {"w50_all": {"mask": "w50", "train": "all"}, "r50_all": {"mask": "r50", "train": "all"}}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(conf))
    with pytest.raises(ValueError, match="ria__0.5 is not a finished, saved cell"):
        study.main(["--config", str(cfg), "--runs", "r50_all"])
    study.main(["--config", str(cfg), "--runs", "w50_all"])
    out = tmp_path / "out"
    cell = json.loads((out / "cells" / "w50_all.json").read_text())
    assert cell["prune"]["cell"] == "wanda__0.5" and cell["prune"]["method"] == "wanda"
    assert cell["achieved_sparsity"] > 0.45 and not (out / "masks").exists()
    assert study.before_scores(conf, out, "w50_all") == gout / "zeroshot" / "wanda__0.5"
