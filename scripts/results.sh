#!/usr/bin/env bash
# Regenerate every results number of README.md and docs/results.md on the current code: the cells of
# configs/results_smollm2.yaml, results_alpha_smollm2.yaml and results_gemma3.yaml (two single-thread
# workers, one per core, sharing the cells; resumable: finished cells are kept, a rerun continues), the
# zero-shot tables of the saved cells, the recovery rows (configs/recover_results_smollm2.yaml), the
# alpha ranking, the claims and the plots, then the generated parts of the pages and the check that every
# shown cell is the current code's. Measured: the 45 cells took 12.3 worker-hours (11-25 minutes a cell,
# two at a time), a zero-shot run 25 (SmolLM2) to 60 (gemma) worker-minutes; the whole run is about
# 25 CPU-hours, some 13 hours of wall time here.
#   bash scripts/results.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
PY=.venv/bin/python
CONFIGS="results_smollm2 results_alpha_smollm2 results_gemma3"
worker() {   # every cell of every config; a cell another worker holds is skipped, so no core waits
  for cfg in $CONFIGS; do .venv/bin/sparsefw compare --config configs/$cfg.yaml; done
}
worker & worker
wait
for cfg in $CONFIGS; do
  .venv/bin/sparsefw compare --config configs/$cfg.yaml --report-only   # the complete table and plot
done
zeroshot_worker() {   # both workers score both configs' saved cells, 100-document shards claimed one at a time
  for cfg in results_gemma3 results_smollm2; do $PY scripts/zeroshot_paired.py --config configs/$cfg.yaml; done
}
zeroshot_worker & zeroshot_worker
wait
$PY scripts/recover_study.py --config configs/recover_results_smollm2.yaml & $PY scripts/recover_study.py --config configs/recover_results_smollm2.yaml
wait
$PY scripts/recover_study.py --config configs/recover_results_smollm2.yaml --report-only
$PY scripts/validation_table.py results/final_alpha_smollm2
$PY scripts/results_claims.py configs/results_smollm2.yaml configs/results_gemma3.yaml
$PY scripts/plot_layer_errors.py results/final_smollm2 --labels sparsefw_swaps0,sparsefw+rec --sparsities 0.5,0.6,2:4
$PY scripts/plot_layer_errors.py results/final_gemma3 --labels sparsefw_swaps0,sparsefw+rec --sparsities 0.6,2:4
$PY scripts/results_docs.py
$PY scripts/results_docs.py --check
