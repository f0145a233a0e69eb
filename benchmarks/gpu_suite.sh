#!/usr/bin/env bash
# GPU suite: install fm_engine on the (offline) GPU machine, run the gpu-marked tests and the benchmarks
# at real sizes (ops, then the training steps of the models with GPU targets), and write everything to
# OUTDIR: gpu_suite.log, gpu_tests.xml, results.json / results.md / results.png.
# Usage: bash benchmarks/gpu_suite.sh OUTDIR      (fits the device's 10-minute limit per command)
set -uo pipefail
OUT=${1:?usage: gpu_suite.sh OUTDIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu_suite.log"
MODELS=${FM_ENGINE_BENCH_MODELS:-"vit-i1-p16-d512-a32_24 stcnnt-mri-hrnet-production"}
{
  echo "== $(date -u +%FT%TZ) fm_engine GPU suite, git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.txt" 2>&1; then
    cat "$OUT/install.txt"; echo "== install failed"; exit 1
  fi
  tail -2 "$OUT/install.txt"; rm -f "$OUT/install.txt"
  python3 -m fm_engine info
  echo "== gpu tests"
  timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" tests 2>&1 | tail -40
  echo "== benchmarks"
  model_args=""
  for m in $MODELS; do model_args="$model_args --model $m"; done
  # --budget: cases not started within it are reported as not run, so the reports are always complete
  timeout 300 python3 -m fm_engine bench --full --op all $model_args --budget 240 --out "$OUT" \
    ${FM_ENGINE_BENCH_ARGS:-} 2>&1
  echo "== done $(date -u +%FT%TZ)"
} 2>&1 | tee "$LOG"
