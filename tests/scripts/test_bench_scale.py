"""scripts/bench_scale.py on a tiny override of the Llama-3-8B shape: part b with two methods records
positive seconds and peak RSS per cell, a second run skips the cells, a prune that fails is recorded
(not raised), and the Markdown has the extrapolation table, with the GPU column from a gpu_check JSON."""
import json

import pytest

TINY = ["hidden_size=64", "intermediate_size=128", "num_attention_heads=4", "num_key_value_heads=2",
        "vocab_size=49152"]


@pytest.fixture(scope="module")
def bench(script):
    return script("bench_scale")


def _args(tmp_path, *extra):
    sets = [x for kv in TINY for x in ("--shape-set", kv)]
    return ["--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "bench_scale.json"),
            "--gpu-json", str(tmp_path / "gpu_check.json"), "--heartbeat-s", "0", *sets, *extra]


def test_part_b_cells_resume_failure_and_extrapolation(bench, tmp_path):
    base = ["--part", "b", "--shapes", "llama3-8b", "--methods", "magnitude,wanda"]
    assert bench.main(_args(tmp_path, *base)) == 0
    res = json.loads((tmp_path / "bench_scale.json").read_text())
    assert set(res["cells"]) == {"b/llama3-8b/magnitude", "b/llama3-8b/wanda"}
    for c in res["cells"].values():
        assert c["completed"] and c["rc"] == 0 and c["blocks"] == 2 and c["layers"] == 14
        assert c["wall_s"] > 0 and c["prune_s"] > 0 and c["s_per_block"] > 0 and c["peak_rss_gib"] > 0.05
        assert c["solve_s_per_layer"] > 0 and len(c["block_solve_s"]) == 2
    assert res["host"]["gemm_flops_per_s"] > 0
    assert not (tmp_path / "work" / "runs" / "b_llama3-8b_wanda").exists()      # outputs deleted
    md = (tmp_path / "bench_scale.md").read_text()
    assert "## (c) Extrapolated hours for the full model" in md
    assert "| llama3-8b | wanda |" in md and "| 32 |" in md and "not measured" in md
    cols = next(line for line in md.splitlines() if line.startswith("| llama3-8b | 2 | wanda |")).split("|")
    wanda = res["cells"]["b/llama3-8b/wanda"]
    assert cols[4].strip() == str(wanda["threads"]) and cols[12].strip() == wanda["code"] != "?"
    fg, rep, _ = (float(v) for v in cols[9].split("/"))          # per block: forwards + Gram, reporting, solve
    t = wanda["timings"]
    assert fg == round((t["calibration_forward"] + t["gram"]) / 2) and rep == round(t["reporting"] / 2)

    assert bench.main(_args(tmp_path, *base)) == 0                             # resumed: nothing re-run
    assert json.loads((tmp_path / "bench_scale.json").read_text())["cells"] == res["cells"]

    assert bench.main(_args(tmp_path, "--part", "b", "--shapes", "llama3-8b", "--methods", "magnitude",
                            "--extra-args=--no-such-flag")) == 0
    bad = json.loads((tmp_path / "bench_scale.json").read_text())["cells"]["b/llama3-8b/magnitude --no-such-flag"]
    assert not bad["completed"] and bad["rc"] == 2 and "--no-such-flag" in bad["tail"]

    gpu = {"info": {"device": "cuda:0"}, "runs": {"llama3-8b/wanda/50%": {
        "s_per_block": 2.0, "solve_s_per_block": 1.0, "forward_s_per_block": 1.0, "nsamples": 8, "seqlen": 2048}}}
    (tmp_path / "gpu_check.json").write_text(json.dumps(gpu))
    assert bench.main(_args(tmp_path, "--render")) == 0
    md = (tmp_path / "bench_scale.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| llama3-8b | wanda |") and "GPU" not in line
               and line.count("|") == 7)
    assert f"{(1.0 + 1.0 * 1024 / 16384) * 32 / 3600:.3g} (gpu_check 8B, rescaled)" in row
    assert "not measured (not in gpu_check)" in md                              # magnitude: not in gpu_check


def test_part_a_inspects_the_full_block_count(bench, tmp_path):
    assert bench.main(_args(tmp_path, "--part", "a")) == 0
    res = json.loads((tmp_path / "bench_scale.json").read_text())
    c = res["cells"]["a/llama3-8b/wanda"]
    assert c["completed"] and c["wall_s"] > 0 and c["peak_rss_gib"] > 0.05 and len(c["block_solve_s"]) == 32
    assert c["inspect"]["linear_layers"] == 224 and c["inspect"]["ok"]
    assert c["inspect"]["min_sparsity"] == pytest.approx(0.5) and c["inspect"]["max_sparsity"] == pytest.approx(0.5)
    assert not (tmp_path / "work" / "runs").joinpath("a_llama3-8b_wanda").exists()
    assert "| a/llama3-8b/wanda | yes |" in (tmp_path / "bench_scale.md").read_text()


def test_run_measured_kills_a_child_past_its_timeout(bench, tmp_path):
    r = bench.run_measured(["sleep", "30"], {}, tmp_path / "sleep.log", timeout_s=0.5, heartbeat_s=0)
    assert r["timed_out"] and r["rc"] == -9 and r["wall_s"] < 10
