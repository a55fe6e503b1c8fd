"""scripts/results_docs.py: the generated parts of the pages come from the cells (hand-computed
means and sample std), hand-written text is kept, and --check fails on a page that is not current."""
import json

PAGE = "intro\n<!-- generated: headline -->\nold numbers\n<!-- /generated: headline -->\nhand-written end\n"


def _grid(root, stem, model, sparsities, methods, cells):
    (root / "configs").mkdir(exist_ok=True)
    (root / "configs" / f"{stem}.yaml").write_text(
        f"model: {model}\noutput: out_{stem}\nsparsities: {json.dumps(sparsities)}\nmethods:\n"
        + "".join(f"  {k}: {v}\n" for k, v in methods.items()))
    (root / f"out_{stem}" / "cells").mkdir(parents=True)
    for cid, (label, sp, ppl) in cells.items():
        (root / f"out_{stem}" / "cells" / f"{cid}.json").write_text(json.dumps(
            {"label": label, "sparsity": sp, "ppl": ppl, "ppl_dense": 5.0 if stem == "results_a" else 6.0,
             "code": "abc1234"}))


def _docs(script, monkeypatch, root, headline=(), pages=("page.md",)):
    """scripts/results_docs.py working on ``root`` with these headline configs and pages."""
    docs = script("results_docs")
    monkeypatch.setattr(docs, "ROOT", root)
    monkeypatch.setattr(docs, "HEADLINE_CONFIGS", headline)
    monkeypatch.setattr(docs, "PAGES", pages)
    return docs


def test_headline_from_cells_and_check(tmp_path, script, monkeypatch):
    docs = _docs(script, monkeypatch, tmp_path, headline=("results_a", "results_b"))
    _grid(tmp_path, "results_a", "smollm2-135m", ["0.6"],
          {"wanda": "{method: wanda, seeds: [0, 1]}", "sparsefw+rec": "{method: sparsefw, reconstruct: true}"},
          {"wanda__0.6__s0": ("wanda", "0.6", 10.0), "wanda__0.6__s1": ("wanda", "0.6", 12.0),
           "sparsefw+rec__0.6": ("sparsefw+rec", "0.6", 8.0)})
    _grid(tmp_path, "results_b", "gemma3-270m", ["2:4"], {"wanda": "{method: wanda}"},
          {"wanda__2of4": ("wanda", "2:4", 20.0)})
    text = docs.regenerate(PAGE)
    assert text.startswith("intro\n<!-- generated: headline -->\n| method | smollm2-135m 60% | gemma3-270m 2:4 |")
    assert text.endswith("<!-- /generated: headline -->\nhand-written end\n") and "old numbers" not in text
    assert "| dense | 5.00 | 6.00 |" in text
    assert "| Wanda | 11.00 ± 1.41 | 20.00 |" in text                  # mean, sample std of 10 and 12
    assert "| `sparsefw --reconstruct` | 8.00 |  |" in text and "| RIA |  |  |" in text
    assert "cells finished" not in text                                # all 4 cells are there
    (tmp_path / "page.md").write_text(PAGE)
    assert docs.main(["--check"]) == 1 and "old numbers" in (tmp_path / "page.md").read_text()   # --check writes nothing
    assert docs.main([]) == 0 and (tmp_path / "page.md").read_text() == text
    assert docs.main(["--check"]) == 1       # the page is current now, but the cells are not this code's
    from sparsefw.report import code_version

    for f in tmp_path.glob("out_*/cells/*.json"):
        f.write_text(f.read_text().replace("abc1234", code_version()))
    assert docs.main(["--check"]) == 0
    (tmp_path / "out_results_b" / "cells" / "wanda__2of4.json").unlink()
    assert docs.main(["--check"]) == 1       # a missing cell (and the table changes)
    assert "| Wanda | 11.00 ± 1.41 |  |" in docs.headline() and "3 of 4 cells finished" in docs.headline()


def test_check_wants_the_images_the_page_shows(tmp_path, script, monkeypatch, capsys):
    docs = _docs(script, monkeypatch, tmp_path, pages=("docs/page.md",))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("text\n![a plot](../res/plot.png)\n")
    assert docs.main(["--check"]) == 1 and "image ../res/plot.png is missing" in capsys.readouterr().out
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "plot.png").write_bytes(b"png")
    assert docs.main(["--check"]) == 0


def test_recovery_part_and_its_check(tmp_path, script, monkeypatch):
    """A recovery part shows recover_study.md without its title; --check wants every run's cell of
    the current code."""
    from sparsefw.report import code_version

    docs = _docs(script, monkeypatch, tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "rec.yaml").write_text("output: rout\nruns: {a: {mask: m}, b: {mask: m}}\n")
    (tmp_path / "rout" / "cells").mkdir(parents=True)
    (tmp_path / "rout" / "recover_study.md").write_text("# Recovery study (x)\n\n| run |\n|---|\n| a |\n")
    (tmp_path / "rout" / "cells" / "a.json").write_text(json.dumps({"code": code_version()}))
    (tmp_path / "page.md").write_text("<!-- generated: recovery:rec -->\n<!-- /generated: recovery:rec -->\n")
    assert docs.main([]) == 0
    assert (tmp_path / "page.md").read_text() == \
        "<!-- generated: recovery:rec -->\n| run |\n|---|\n| a |\n<!-- /generated: recovery:rec -->\n"
    assert docs.main(["--check"]) == 1
    (tmp_path / "rout" / "cells" / "b.json").write_text(json.dumps({"code": code_version()}))
    assert docs.main(["--check"]) == 0


def test_table_has_validation_perplexity(tmp_path, script, monkeypatch):
    """A config with a validation text gets a validation-perplexity table below its main table."""
    docs = _docs(script, monkeypatch, tmp_path)
    _grid(tmp_path, "results_a", "smollm2-135m", ["0.6"], {"wanda": "{method: wanda, seeds: [0, 1]}"},
          {"wanda__0.6__s0": ("wanda", "0.6", 10.0), "wanda__0.6__s1": ("wanda", "0.6", 12.0)})
    cfg = tmp_path / "configs" / "results_a.yaml"
    cfg.write_text(cfg.read_text() + "validation: austen\n")
    for i, f in enumerate(sorted((tmp_path / "out_results_a" / "cells").glob("*.json"))):
        cell = json.loads(f.read_text())
        f.write_text(json.dumps({**cell, "ppl_val": 30.0 + 4 * i, "ppl_val_dense": 25.0, "validation": "austen",
                                 "error_reduction_vs_wanda": 0.0, "prune_seconds": 1.0}))
    text = docs.table("results_a")
    assert text.startswith("`configs/results_a.yaml`: 2 of 2 cells, code abc1234.")
    assert "Validation perplexity (austen" in text and "| dense | 25.00 |" in text
    assert "| wanda | 32.00 ± 2.83 |" in text                     # mean and sample std of 30 and 34


def test_alpha_part_says_how_many_cells_are_missing(tmp_path, script, monkeypatch):
    docs = _docs(script, monkeypatch, tmp_path)
    _grid(tmp_path, "results_al", "smollm2-135m", ["0.6"],
          {"a0.5": "{method: sparsefw, alpha: 0.5}", "a0.9": "{method: sparsefw, alpha: 0.9}"}, {})
    assert docs.section("alpha:results_al") == "(not measured yet)\n"
    (tmp_path / "out_results_al" / "cells" / "a0.5__0.6.json").write_text(json.dumps(
        {"label": "a0.5", "sparsity": "0.6", "ppl": 50.0, "ppl_dense": 5.0, "ppl_val": 60.0, "ppl_val_dense": 6.0,
         "code": "abc1234", "error_reduction_vs_wanda": 0.25, "prune_seconds": 10.0,
         "options": {"method": "sparsefw", "alpha": 0.5, "iterations": 10}}))
    text = docs.section("alpha:results_al")
    assert text.startswith("1 of 2 cells finished; the others are still running.\n\n")
    assert "| sparsefw α 0.5, 10 iterations | 60.00 | 60.00 | 50.00 | -25.0% | 10 |" in text
