#!/usr/bin/env bash
# One GPU call: install, the GPU test suite (bf16 included), the full benchmarks.
# Usage: benchmarks/gpu.sh OUTDIR [--quick]
# Writes OUTDIR/gpu.log (everything printed), OUTDIR/<device>.json and .md (results,
# unedited; commit them under benchmarks/results/), OUTDIR/<family>.png (plots).
# Uses only the machine's preinstalled packages (torch, triton, pytest, matplotlib).
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu.sh OUTDIR [--quick]}
QUICK=${2:-}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu.log"
PY=${PYTHON:-python3}
status=0
{
  echo "== install (builds fastnets._C when nvcc and a CUDA torch are here)"
  start=$(date +%s)
  if ! $PY -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -3; then
    echo "!! extension build failed; installing without it (cuda backend will JIT-build or report why)"
    FASTNETS_BUILD_EXT=0 $PY -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -3 || exit 1
  fi
  echo "install took $(( $(date +%s) - start )) s"
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
  $PY -m fastnets info
  echo; echo "== tests on the GPU (CUDA tensors, fp32/fp16/bf16, gpu-marked included)"
  $PY -m pytest tests -q -p no:cacheprovider -x --durations=5 || status=1
  echo; echo "== benchmarks"
  $PY -m fastnets bench --out "$OUT" $QUICK || status=1
  echo "gpu.sh finished with status $status"
  exit $status
} 2>&1 | tee "$LOG"
exit ${PIPESTATUS[0]}
