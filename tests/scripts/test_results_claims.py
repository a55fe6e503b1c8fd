"""scripts/results_claims.py: hand-made cells give the hand-computed claims."""
import json


def test_claims_from_hand_made_cells(tmp_path, script):
    mod = script("results_claims")
    cfg = tmp_path / "results_x.yaml"
    cfg.write_text(f"""model: smollm2-135m
output: {tmp_path / 'out'}
sparsities: ["0.5", "2:4"]
methods:
  wanda: {{method: wanda, seeds: [0, 1]}}
  ria: {{method: ria}}
  sparsefw: {{method: sparsefw}}
""")
    cells = tmp_path / "out" / "cells"
    cells.mkdir(parents=True)

    def cell(cid, label, sp, ppl, seed=None, errors=None):
        (cells / f"{cid}.json").write_text(json.dumps({
            "label": label, "sparsity": sp, "seed": seed, "ppl": ppl, "prune_seconds": 10.0,
            "layer_errors": errors or {"x": [1.0, 1.0]}}))

    cell("wanda__0.5__s0", "wanda", "0.5", 40.0, 0)
    cell("wanda__0.5__s1", "wanda", "0.5", 44.0, 1)
    cell("ria__0.5", "ria", "0.5", 35.0)
    # per-layer reductions 1 - e / e_wanda: 0.8, 0.5, 0.1 -> max 80%, median 50%
    cell("sparsefw__0.5", "sparsefw", "0.5", 30.0, errors={"a": [0.2, 1.0], "b": [1.0, 2.0], "c": [0.9, 1.0]})
    cell("wanda__2of4__s0", "wanda", "2:4", 45.0, 0)
    cell("wanda__2of4__s1", "wanda", "2:4", 47.0, 1)
    cell("ria__2of4", "ria", "2:4", 60.0)
    cell("sparsefw__2of4", "sparsefw", "2:4", 50.0)
    out = tmp_path / "claims"
    assert mod.main([str(cfg), "--ours", "sparsefw", "--out", str(out)]) == 0
    data = json.loads((out / "claims.json").read_text())["smollm2-135m"]
    assert data["sparsefw 0.5"]["layer"] == {"max": 0.8, "median": 0.5, "layers": 3}
    assert data["sparsefw 0.5"]["ppl"] == {"ours": 30.0, "wanda": 42.0, "ria": 35.0, "holds": True}
    assert data["sparsefw 2:4"]["ppl"] == {"ours": 50.0, "wanda": 46.0, "ria": 60.0, "holds": False}
    assert data["sparsefw 0.6"] == {"layer": None, "ppl": None}
    md = (out / "claims.md").read_text()
    assert "| sparsefw | 0.5 | 80.0% | 50.0% | 30.00 | 42.00 | 35.00 | holds |" in md
    assert "| sparsefw | 2:4 | 0.0% | 0.0% | 50.00 | 46.00 | 60.00 | does not hold |" in md
    assert (out / "frontier.png").stat().st_size > 0
