#!/usr/bin/env bash
# GPU check: run from the repository root on any machine with an NVIDIA GPU and
# torch + transformers + accelerate + safetensors (no lm-eval, no datasets, no pip install):
#   bash scripts/gpu_check.sh [--json results.json]
# Small shapes on the CPU (what the test suite runs):  bash scripts/gpu_check.sh --device cpu --small
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec $PY scripts/gpu_check.py "$@"
