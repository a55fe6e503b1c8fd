#!/usr/bin/env bash
# The first 500 documents of each of the seven zero-shot tasks for Wanda, SparseGPT
# and warmstart + swaps + reconstruction (`swaps --reconstruct`) at 60% on SmolLM2-135M (the calibration of configs/owl_smollm2.yaml:
# 32 x 512 wiki windows, seed 0), scored shard by shard so that an interrupted run resumes.
# The dense model's shards are results/zeroshot_dense_smollm2 (full splits; its first 500 documents
# per task are the same documents). Then: python scripts/zeroshot_paired.py
#   OMP_NUM_THREADS=1 bash scripts/zeroshot60.sh            (about 2 h on one thread)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/sparsefw}
CAL="--model smollm2-135m --sparsity 0.6 --calib wiki --nsamples 32 --seqlen 512 --seed 0"
declare -A OPTS=([wanda]="--method wanda" [sparsegpt]="--method sparsegpt"
                 [sparsefw_rec]="--method swaps --reconstruct")   # label from when sparsefw ran warmstart + swaps
for m in ${METHODS:-wanda sparsegpt sparsefw_rec}; do
  ckpt=runs/zeroshot60/$m
  if [ ! -f "$ckpt/report.json" ]; then
    $PY prune $CAL ${OPTS[$m]} --output "$ckpt" --overwrite
  fi
  $PY eval-zeroshot --model "$ckpt" --limit 500 --batch-size 16 --shard-size 500 \
      --resume-dir "results/zeroshot60_smollm2/$m" --output "results/zeroshot60_smollm2/$m/report.json"
done
