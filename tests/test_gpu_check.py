"""scripts/gpu_check.sh runs on the CPU with small shapes, importing nothing that
the GPU machine lacks (lm-eval, datasets and the other extras are blocked here)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("lm_eval", "datasets", "rdata", "matplotlib", "gguf", "pytest")


def test_gpu_check_small_on_cpu_without_extras(tmp_path):
    blocker = tmp_path / "blocker.py"
    blocker.write_text(
        "import runpy, sys\n"
        f"for m in {BLOCKED!r}:\n    sys.modules[m] = None   # import m -> ImportError\n"
        "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    out = tmp_path / "res.json"
    env = {**os.environ, "PYTHON": f"{sys.executable} {blocker}", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--small",
                        "--json", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    for meth in ("wanda", "sparsegpt", "sparsefw", "sparsefw+rec"):
        assert sum(1 for l in lines if f" {meth} " in l) == 4, meth   # 2 models x 2 patterns
    assert "masks agree on 100.000% of entries" in r.stdout
    assert "extrapolated full 32-block prune" in r.stdout and out.exists()
    assert "2:4 semi-structured matmul: skipped (semi-structured sparse kernels need a CUDA GPU)" in r.stdout
