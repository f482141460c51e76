#!/usr/bin/env bash
# GPU checks and timings of issue 5 in one short run (about 2-4 minutes on one GPU):
#   faiss GPU == CPU, CUDA scores == CPU scores, coreset steps/s at N = 10,000,000 x 128.
# Usage: bash benchmarks/gpu_check.sh [--cpu-smoke] [gpu_check.py flags]; PYTHON=... to pick an
# interpreter (default: python). Exits non-zero if a check fails or it runs past 330 s.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python}
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
exec timeout 330 "$python_bin" benchmarks/gpu_check.py "$@"
