"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node N``: prune one tiny model with
every method variant, each into OUT/<variant>/ (written by the main process only). A script, not a
test module: it imports nothing from the tests.

    torchrun --standalone --nproc_per_node 2 tests/dist_driver.py MODEL_DIR TEXT_FILE OUT [VARIANT,...]
"""
import sys

from sparsefw import api

# each method with its own options only (SparseFW: 30 FW iterations, then the swaps)
OPTIONS = {"sparsefw": dict(iterations=30)}
VARIANTS = {f"{m}{'+rec' if rec else ''}__{pat.replace(':', 'of')}":
            dict(method=m, pattern=pat, reconstruct=rec, **OPTIONS.get(m, {}))
            for m, rec in [("magnitude", False), ("wanda", False), ("ria", False), ("sparsegpt", False),
                           ("swaps", False), ("sparsefw", False), ("sparsefw", True)]
            for pat in ("unstructured", "2:4")}
VARIANTS["sparsefw+owl+ts__unstructured"] = dict(method="sparsefw", owl=True, owl_lambda=0.1, true_sequential=True,
                                                 **OPTIONS["sparsefw"])
VARIANTS["sparsegpt+ts__unstructured"] = dict(method="sparsegpt", true_sequential=True)
MOE_ONLY = {"wanda+drop__unstructured": dict(method="wanda", drop_experts=1)}   # REAP: MoE models only

if __name__ == "__main__":
    model, text, out = sys.argv[1:4]
    only = sys.argv[4].split(",") if len(sys.argv) > 4 else list(VARIANTS)
    for name, kw in ((n, {**VARIANTS, **MOE_ONLY}[n]) for n in only):
        api.prune(model, output=f"{out}/{name}", sparsity=0.5, calib=text, nsamples=20, seqlen=24,
                  device="cpu", progress=False, **kw)
