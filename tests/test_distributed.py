"""Several processes (sparsefw/distributed.py): ``torchrun`` with 2 CPU processes (gloo) gives exactly
the masks and weights of 1 process for every method (tests/dist_driver.py), a failure on one rank
fails the run with one error line and no output, and the window ranges are contiguous (whole chunks
when asked)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_driver import VARIANTS
from sparsefw.calibration import calibration_windows

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def torchrun(n: int, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    return subprocess.run([*TORCHRUN, "--nproc_per_node", str(n), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer, make_tiny):
    d = tmp_path_factory.mktemp("dist")
    m = make_tiny("llama", len(tokenizer), hidden=64, layers=2)
    m.save_pretrained(d / "model")
    tokenizer.save_pretrained(d / "model")
    text = d / "text.txt"
    text.write_text(" ".join(Path(__file__).read_text().split()) * 3)
    return d, text


def test_two_processes_equal_one(setup):
    """20 windows: rank 0 takes windows 0-9, rank 1 windows 10-19."""
    d, text = setup
    for n in (1, 2):
        r = torchrun(n, HERE / "dist_driver.py", d / "model", text, d / f"out{n}")
        assert r.returncode == 0, r.stderr[-3000:]
    names = [n for n in load_file(d / "out1" / next(iter(VARIANTS)) / "model.safetensors") if "proj" in n]
    assert len(names) == 2 * 7
    for variant in VARIANTS:
        one = load_file(d / "out1" / variant / "model.safetensors")
        two = load_file(d / "out2" / variant / "model.safetensors")
        assert one.keys() == two.keys()
        for k in one:
            assert torch.equal(one[k], two[k]), (variant, k)
        rep = (d / "out2" / variant / "report.json").read_text()
        assert '"processes": 2' in rep and ('"achieved_sparsity": 0.5' in rep or "owl" in variant)


MOE_VARIANTS = ("sparsefw__unstructured", "sparsegpt__2of4", "sparsefw+owl+ts__unstructured", "wanda+drop__unstructured")


def test_two_processes_equal_one_on_moe(setup, tokenizer, make_tiny):
    """Mixtral (fused experts, routed calibration, REAP expert dropping): 1 and 2 processes give the
    same tensors."""
    d, text = setup
    m = make_tiny("mixtral", len(tokenizer), hidden=32, layers=2)
    m.save_pretrained(d / "moe")
    tokenizer.save_pretrained(d / "moe")
    for n in (1, 2):
        r = torchrun(n, HERE / "dist_driver.py", d / "moe", text, d / f"moe{n}", ",".join(MOE_VARIANTS))
        assert r.returncode == 0, r.stderr[-3000:]
    for variant in MOE_VARIANTS:
        one = load_file(d / "moe1" / variant / "model.safetensors")
        two = load_file(d / "moe2" / variant / "model.safetensors")
        assert one.keys() == two.keys() and any(".experts." in k for k in one)
        for k in one:
            assert torch.equal(one[k], two[k]), (variant, k)
        rep = (d / "moe2" / variant / "report.json").read_text()
        experts = 4 - ("drop" in variant)                        # --drop-experts 1 keeps 3 of 4
        assert '"processes": 2' in rep and f'"expert_layers": {2 * 2 * experts}' in rep


def test_recover_two_processes_equal_one(setup):
    """``sparsefw recover`` under DDP: 2 processes split each step's 2 micro-batches; the gradients
    are averaged across them (scaled by powers of 2, summed once), so the recovered weights equal one
    process's bit for bit here, with the mask kept; --grad-accum not divisible by the processes is an
    error line."""
    from sparsefw import api

    d, text = setup
    student = d / "rec_student"
    api.prune(str(d / "model"), output=str(student), method="wanda", sparsity=0.5, calib=str(text), nsamples=8,
              seqlen=24, device="cpu", progress=False)
    args = ["-m", "sparsefw", "recover", "--model", student, "--teacher", d / "model", "--calib", text,
            "--nsamples", 8, "--seqlen", 24, "--batch", 1, "--grad-accum", 2, "--steps", 3, "--lr", "1e-3",
            "--warmup", 1, "--device", "cpu"]
    for n in (1, 2):
        r = torchrun(n, *args, "--output", d / f"rec{n}")
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = load_file(d / "rec1" / "model.safetensors"), load_file(d / "rec2" / "model.safetensors")
    before = load_file(student / "model.safetensors")
    assert one.keys() == two.keys() == before.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert all(torch.equal(before[k] != 0, two[k] != 0) for k in before if k.endswith("proj.weight"))
    assert any(not torch.equal(before[k], two[k]) for k in before)
    r = torchrun(2, *args[:-2], "--grad-accum", 3, "--device", "cpu", "--output", d / "rec3")
    assert r.returncode != 0 and "multiple of the 2 processes" in r.stdout + r.stderr
    assert not (d / "rec3").exists()


def test_failing_rank_fails_the_run(setup, tokenizer, make_tiny):
    """Rank 1's windows (the second 8 of 16) hold a token whose embedding is NaN: both
    processes stop with rank 1's message, printed once, and nothing is written."""
    d, text = setup
    windows = calibration_windows(tokenizer, str(text), 16, 24, seed=0)
    only_rank1 = set(windows[8:].flatten().tolist()) - set(windows[:8].flatten().tolist())
    assert only_rank1
    m = make_tiny("llama", len(tokenizer), hidden=64, layers=2)
    with torch.no_grad():
        m.get_input_embeddings().weight[min(only_rank1)] = float("nan")
    bad = d / "bad"
    m.save_pretrained(bad)
    tokenizer.save_pretrained(bad)
    out = d / "bad_out"
    r = torchrun(2, "-m", "sparsefw", "prune", "--model", bad, "--method", "wanda", "--calib", text,
                 "--nsamples", 16, "--seqlen", 24, "--device", "cpu", "--output", out)
    assert r.returncode != 0
    errors = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "NaN/Inf" in errors[0], r.stderr[-3000:]
    assert not out.exists()


def test_window_ranges_whole_chunks():
    from sparsefw.distributed import Ranks, window_range

    assert [window_range(20, Ranks(r, 2), 8) for r in range(2)] == [range(0, 8), range(8, 20)]
    assert [window_range(5, Ranks(r, 2), 8) for r in range(2)] == [range(0, 0), range(0, 5)]   # rank 0 idle
    assert [window_range(64, Ranks(r, 3), 8) for r in range(3)] == [range(0, 16), range(16, 40), range(40, 64)]
    assert [window_range(7, Ranks(r, 2)) for r in range(2)] == [range(0, 3), range(3, 7)]
