#!/usr/bin/env bash
# The one command a GPU session runs: everything a GPU can tell about fm_engine, in at most 9 minutes on a
# 16-core H100/H200 machine with cold caches, returned in at most 8 files.
#
#   bash benchmarks/gpu_suite.sh OUTDIR           # on the GPU machine (offline install, real sizes)
#   bash benchmarks/gpu_suite.sh --smoke OUTDIR   # the same stages at tiny sizes on a CPU, in a few minutes
#
# Stages, each with its own time budget (and a global deadline), each writing its results the moment it
# ends, so a stage cut by its budget never loses what earlier stages measured:
#   install    pip install --no-build-isolation --no-deps -e .   (builds csrc with nvcc)
#   tests      the whole suite on the GPU (pytest-xdist, per-test timeout; the AOT compile gate is CPU CI's)
#   ops        op benchmarks, each op's headline case first, interleaved across ops
#   models     training steps (bf16 autocast): reference / auto / torch.compile, defaults and dropout 0
#   maxbatch   the largest AViT batch at 3072x2304 that fits
#   breakdown  per-op breakdown + profile of the GPU-target models' steps
#   tune       (only with FM_ENGINE_SUITE_TUNE=1) fm-engine tune --model for the GPU-target models
# OUTDIR: summary.md, summary.json (test counts, every benchmark ratio, stage times), ops.json, ops.md,
# ops.png, models.json, models.md, details.tar.gz (logs, junit XML, breakdowns, profiles, tuning table).
set -uo pipefail

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
OUT=${1:?usage: gpu_suite.sh [--smoke] OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
D="$WORK/details"
mkdir -p "$D"
export PYTHONUNBUFFERED=1
START=$(date +%s)
if [ "$SMOKE" = 1 ]; then
  TOTAL=${FM_ENGINE_SUITE_SECONDS:-300}
  MODELS=${FM_ENGINE_SUITE_MODELS:-"vit-cifar10-adaptive"}
  SIZE=--quick
  PY_TESTS=(tests/test_evidence.py)
else
  TOTAL=${FM_ENGINE_SUITE_SECONDS:-540}
  MODELS=${FM_ENGINE_SUITE_MODELS:-"vit-i1-p16-d512-a32_24 stcnnt-mri-hrnet-production"}
  SIZE=--full
  PY_TESTS=(tests)
fi
AVIT=${MODELS%% *}
STAGES_JSON="$WORK/stages.tsv"
: > "$STAGES_JSON"

left() { echo $(( TOTAL - ($(date +%s) - START) )); }

# run_stage NAME BUDGET RESERVE CMD...: runs CMD under min(BUDGET, time left - RESERVE) seconds, logs to
# details/NAME.log, records status and seconds; RESERVE keeps time for the stages after it.
run_stage() {
  local name=$1 budget=$2 reserve=$3; shift 3
  local avail=$(( $(left) - reserve ))
  local t=$(( budget < avail ? budget : avail ))
  if [ "$t" -lt 5 ]; then
    printf '%s\tskipped: no time left\t0\n' "$name" >> "$STAGES_JSON"
    echo "== $name: skipped (no time left)"
    return 1
  fi
  echo "== $name (budget ${t}s) $(date -u +%T)"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$t" "$@" > "$D/$name.log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="cut at its ${t}s budget"; elif [ "$rc" != 0 ]; then status="exit $rc"; fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$dt" >> "$STAGES_JSON"
  tail -5 "$D/$name.log"
  echo "== $name: $status in ${dt}s"
  [ "$status" = ok ]
}

summarize() {
  python3 -m benchmarks.suite summarize --work "$WORK" --out "$OUT" --smoke "$SMOKE" || echo "== summary failed"
  tar -czf "$OUT/details.tar.gz" -C "$WORK" details stages.tsv 2>/dev/null
  rm -rf "$WORK"
  echo "== done in $(( $(date +%s) - START ))s: $(ls "$OUT" | tr '\n' ' ')"
}

{
  echo "fm_engine GPU suite$([ "$SMOKE" = 1 ] && echo ' (smoke)'), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
} > "$D/machine.txt"
cat "$D/machine.txt"

if [ "$SMOKE" = 1 ]; then
  run_stage install 30 250 python3 -c "import fm_engine; print('smoke: install skipped, import ok')"
else
  if ! run_stage install 150 330 python3 -m pip install --no-build-isolation --no-deps -e .; then
    echo "== install failed: later stages cannot run"
    summarize
    exit 1
  fi
fi
python3 -m fm_engine info > "$D/info.txt" 2>&1

# tests: xdist workers share the GPU; the compile gate needs no GPU and runs in CPU CI
TIMEOUT_ARG=()
python3 -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARG=(--timeout=150)
XDIST=(-n 12)
[ "$SMOKE" = 1 ] && XDIST=(-n 0)
# FM_ENGINE_AUTOTUNE=0: each kernel runs its first config, so the suite compiles one config per kernel instead
# of every candidate in every worker (the compile gate checks all configs; test_autotune tunes for real)
run_stage tests 170 230 env FM_ENGINE_AUTOTUNE=0 python3 -m pytest "${PY_TESTS[@]}" "${XDIST[@]}" -q \
  -p no:cacheprovider "${TIMEOUT_ARG[@]}" --ignore=tests/test_compile_gate.py --junitxml="$D/tests.xml"

if [ "$SMOKE" = 1 ]; then
  # the interpreter runs the Triton kernels (a CPU-machine run even where a GPU is visible)
  run_stage ops 60 120 env TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES= python3 -m fm_engine bench --quick \
    --interleave --op relu2 --backend triton --budget 30 --out "$D/ops"
else
  # the first call of each case tunes its kernels (compiling every candidate config): a larger budget
  run_stage ops 140 155 python3 -m fm_engine bench --full --interleave --op all --budget 120 --out "$D/ops"
fi

MODEL_ARGS=()
for m in $MODELS; do MODEL_ARGS+=(--model "$m"); done
SMOKE_ARGS=()
# smoke: no torch.compile label (minutes of CPU compilation) and one setting
[ "$SMOKE" = 1 ] && SMOKE_ARGS=(--backend auto --setting "dropout 0")
run_stage models 80 75 python3 -m fm_engine bench $SIZE "${MODEL_ARGS[@]}" "${SMOKE_ARGS[@]}" --budget 60 \
  --out "$D/models"
run_stage maxbatch 35 40 python3 -m fm_engine bench $SIZE --model "$AVIT" --setting "dropout 0" --max-batch \
  --backend auto --budget 30 --out "$D/maxbatch"
run_stage breakdown 40 0 python3 -m fm_engine bench $SIZE "${MODEL_ARGS[@]}" --setting "dropout 0" --breakdown \
  --profile --out "$D/breakdown"
if [ "${FM_ENGINE_SUITE_TUNE:-0}" = 1 ]; then
  for m in $MODELS; do
    run_stage "tune-$m" 120 5 python3 -m fm_engine tune --model "$m" $SIZE --ship
  done
  cp fm_engine/evidence/*.json "$D/" 2>/dev/null
fi
summarize
