"""scripts/check_results_current.py: a cell made by other code, or missing, fails the check."""
import json

from sparsefw.report import code_version


def test_current_stale_and_missing_cells(tmp_path, capsys, script):
    mod = script("check_results_current")
    cfg = tmp_path / "results_x.yaml"
    cfg.write_text(f"""model: smollm2-135m
output: {tmp_path / 'out'}
sparsities: ["0.5", "2:4"]
methods:
  wanda: {{method: wanda, seeds: [0, 1]}}
  magnitude: {{method: magnitude, sparsities: ["0.5"]}}
""")
    cells = tmp_path / "out" / "cells"
    cells.mkdir(parents=True)
    now = code_version()
    for cid in ("wanda__0.5__s0", "wanda__0.5__s1", "wanda__2of4__s0", "wanda__2of4__s1", "magnitude__0.5"):
        (cells / f"{cid}.json").write_text(json.dumps({"code": now}))
    assert mod.main([str(cfg)]) == 0
    assert "all cells current" in capsys.readouterr().out
    (cells / "wanda__2of4__s1.json").write_text(json.dumps({"code": "0000000"}))
    (cells / "magnitude__0.5.json").unlink()
    assert mod.main([str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "stale wanda__2of4__s1 (code 0000000)" in out and "missing magnitude__0.5" in out
    assert "2 problem(s)" in out
