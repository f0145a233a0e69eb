#!/usr/bin/env bash
# GPU suite: install fm_engine on the (offline) GPU machine, run the gpu-marked tests and the
# benchmarks at real sizes, and write everything to OUTDIR (results.json/.md/.png, logs).
# Usage: bash benchmarks/gpu_suite.sh OUTDIR   (must finish within 10 minutes)
set -uo pipefail
OUT=${1:?usage: gpu_suite.sh OUTDIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu_suite.log"
{
  echo "== $(date -u +%FT%TZ) fm_engine GPU suite, git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
  python3 -m fm_engine info
  echo "== gpu tests"
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" tests 2>&1 | tail -40
  echo "== benchmarks"
  timeout 300 python3 -m fm_engine bench --full --out "$OUT" ${FM_ENGINE_BENCH_ARGS:-} 2>&1
  echo "== done $(date -u +%FT%TZ)"
} 2>&1 | tee "$LOG"
