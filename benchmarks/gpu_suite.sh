#!/usr/bin/env bash
# The one command a GPU session runs: everything a GPU can tell about fm_engine, in at most 500 s (install and
# summary included) on a 16-core H100/H200 machine with cold caches, returned in at most 8 files.
#
#   bash benchmarks/gpu_suite.sh OUTDIR           # on the GPU machine (offline install, real sizes)
#   bash benchmarks/gpu_suite.sh --smoke OUTDIR   # the same stages in the same order at tiny sizes on a CPU
#
# Stages, in this order (what matters most first), each with its own time budget and a global deadline:
#   install         pip install --no-build-isolation --no-deps -e .   (builds csrc with nvcc)
#   tune            fm-engine tune --model for the target models: writes the tuning table (--ship: also
#                   fm_engine/evidence/<device>.json, to commit); the later stages' `auto` follows it
#   models          training steps (bf16 autocast), reference and auto, defaults and dropout 0
#   breakdown       per-op breakdown + profile of the target models' steps
#   ops             op benchmarks, each op's headline case first, interleaved across ops
#   maxbatch        the largest AViT batch at 3072x2304 that fits
#   tests           GPU-marked tests first (kernel parity at real sizes among them), then the rest of the suite
#   models-compile  last: the model steps with the torch.compile label (its compilation can take minutes)
# Every stage appends its results as it goes (benchmarks: after each case; tests: each test's outcome to
# details/tests-progress.jsonl), and a stage over its budget gets SIGINT (pytest then writes its junit XML,
# `fm-engine tune` keeps the buckets it measured) and SIGKILL 10 s later: a cut stage still reports what
# finished. FM_ENGINE_SUITE_CUT="STAGE:SECONDS" sets one stage's budget (the smoke test cuts a stage on purpose);
# FM_ENGINE_SUITE_SCALE=N multiplies every budget (a slow or shared machine).
# --smoke never ships: its tables stay in its work folder (FM_ENGINE_CACHE_DIR points there); it uses
# torch.compile's aot_eager backend for the ops' compile backend (inductor's CPU compilations take minutes).
# OUTDIR: summary.md, summary.json (test counts, every benchmark ratio, stage times), ops.json, ops.md,
# ops.png, models.json, models.md, details.tar.gz (logs, junit XML, breakdowns, profiles, tuning tables).
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
# per stage: "BUDGET RESERVE" (seconds; RESERVE is kept for the stages after it)
if [ "$SMOKE" = 1 ]; then
  TOTAL=${FM_ENGINE_SUITE_SECONDS:-600}
  B_INSTALL="30 500" B_TUNE="80 410" TUNE_BUDGET=20 B_MODELS="130 280" B_BREAKDOWN="80 200" B_OPS="60 140"
  B_MAXBATCH="40 100" B_TESTS="120 45" B_COMPILE="60 5"
  MODELS=${FM_ENGINE_SUITE_MODELS:-"vit-cifar10-adaptive"}
  SIZE=--quick
  PY_TESTS=(tests/test_evidence.py)
  SHIP=()
  export FM_ENGINE_CACHE_DIR="$WORK/cache"  # the smoke run's tables never leave its work folder
  export FM_ENGINE_COMPILE_BACKEND=aot_eager
else
  TOTAL=${FM_ENGINE_SUITE_SECONDS:-500}
  B_INSTALL="150 300" B_TUNE="100 230" TUNE_BUDGET=75 B_MODELS="60 170" B_BREAKDOWN="35 135" B_OPS="75 90"
  B_MAXBATCH="30 60" B_TESTS="90 20" B_COMPILE="120 5"
  MODELS=${FM_ENGINE_SUITE_MODELS:-"vit-i1-p16-d512-a32_24 stcnnt-mri-hrnet-production"}
  SIZE=--full
  PY_TESTS=(tests)
  SHIP=(--ship)
fi
# FM_ENGINE_SUITE_SCALE=N multiplies every budget and the total (a slow or shared machine)
SCALE=${FM_ENGINE_SUITE_SCALE:-1}
TOTAL=$(( TOTAL * SCALE ))
AVIT=${MODELS%% *}
STAGES_JSON="$WORK/stages.tsv"
: > "$STAGES_JSON"
export FM_ENGINE_SUITE_TESTLOG="$D/tests-progress.jsonl"

left() { echo $(( TOTAL - ($(date +%s) - START) )); }

# run_stage NAME BUDGET RESERVE CMD...: runs CMD under min(BUDGET, time left - RESERVE) seconds, logs to
# details/NAME.log, records status and seconds; RESERVE keeps time for the stages after it. Over its budget
# the stage gets SIGINT (its process group), then SIGKILL 10 s later.
run_stage() {
  local name=$1 budget=$(( $2 * SCALE )) reserve=$(( $3 * SCALE )); shift 3
  local cut=${FM_ENGINE_SUITE_CUT:-}
  if [ "${cut%%:*}" = "$name" ]; then budget=${cut##*:}; fi
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
  timeout --signal=INT --kill-after=10 "$t" "$@" > "$D/$name.log" 2>&1
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
  mkdir -p "$D/tables"
  cp "${FM_ENGINE_CACHE_DIR:-$HOME/.cache/fm_engine}"/tables/*.json "$D/tables/" 2>/dev/null
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

# 1. install
if [ "$SMOKE" = 1 ]; then
  run_stage install $B_INSTALL python3 -c "import fm_engine; print('smoke: install skipped, import ok')"
else
  if ! run_stage install $B_INSTALL python3 -m pip install --no-build-isolation --no-deps -e .; then
    echo "== install failed: later stages cannot run"
    summarize
    exit 1
  fi
fi
python3 -m fm_engine info > "$D/info.txt" 2>&1

MODEL_ARGS=()
for m in $MODELS; do MODEL_ARGS+=(--model "$m"); done

# 2. tune the target models (reference, compile and every fast backend per bucket of their steps)
# (--budget: no new bucket after that many seconds of timing, so the stage normally ends by itself)
TUNE_ARGS=()
[ "$SMOKE" = 1 ] && TUNE_ARGS=(--setting "dropout 0")
run_stage tune $B_TUNE python3 -m fm_engine tune "${MODEL_ARGS[@]}" $SIZE "${TUNE_ARGS[@]}" "${SHIP[@]}" \
  --budget "$TUNE_BUDGET" --no-progress
cp fm_engine/evidence/*.json "$D/" 2>/dev/null

# 3. model steps with that table: reference and auto
SMOKE_ARGS=()
[ "$SMOKE" = 1 ] && SMOKE_ARGS=(--setting "dropout 0")
run_stage models $B_MODELS python3 -m fm_engine bench $SIZE "${MODEL_ARGS[@]}" --backend auto "${SMOKE_ARGS[@]}" \
  --budget 50 --out "$D/models"

# 4. breakdown
run_stage breakdown $B_BREAKDOWN python3 -m fm_engine bench $SIZE "${MODEL_ARGS[@]}" --setting "dropout 0" --breakdown \
  --profile --out "$D/breakdown"

# 5. op benchmarks
if [ "$SMOKE" = 1 ]; then
  # the interpreter runs the Triton kernels (a CPU-machine run even where a GPU is visible)
  run_stage ops $B_OPS env TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES= python3 -m fm_engine bench --quick \
    --interleave --op relu2 --backend triton --budget 25 --out "$D/ops"
else
  # the first call of each case tunes its kernels (compiling every candidate config): a larger budget
  run_stage ops $B_OPS python3 -m fm_engine bench --full --interleave --op all --budget 60 --out "$D/ops"
fi

# 6. the largest AViT batch
run_stage maxbatch $B_MAXBATCH python3 -m fm_engine bench $SIZE --model "$AVIT" --setting "dropout 0" --max-batch \
  --backend auto --budget 25 --out "$D/maxbatch"

# 7. tests: GPU-marked first (kernel parity at real sizes), then the rest; each test's outcome is appended to
# details/tests-progress.jsonl as it ends. xdist workers share the GPU; the compile gate runs in CPU CI.
TIMEOUT_ARG=()
python3 -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARG=(--timeout=150)
XDIST=(-n 12)
[ "$SMOKE" = 1 ] && XDIST=(-n 0)
# FM_ENGINE_AUTOTUNE=0: each kernel runs its first config, so the suite compiles one config per kernel instead
# of every candidate in every worker (the compile gate checks all configs; test_autotune tunes for real)
PYTEST=(python3 -m pytest "${PY_TESTS[@]}" -q -p no:cacheprovider -p benchmarks.pytest_progress "${TIMEOUT_ARG[@]}"
        --ignore=tests/test_compile_gate.py)
# the trap: SIGINT ends the stage after the pytest it interrupted (which writes its XML), not just that pytest
# (pytest exits 5 when -m gpu selects nothing)
run_stage tests $B_TESTS env FM_ENGINE_AUTOTUNE=0 bash -c 'trap "exit 130" INT
  "$@" -m gpu --junitxml='"$D"'/tests-gpu.xml; a=$?
  "$@" -m "not gpu" '"${XDIST[*]}"' --junitxml='"$D"'/tests.xml; b=$?
  if [ $a = 0 ] || [ $a = 5 ]; then exit $b; fi; exit $a' _ "${PYTEST[@]}"

# 8. last: the model steps with the torch.compile label (reference again, as the ratio's base)
run_stage models-compile $B_COMPILE python3 -m fm_engine bench $SIZE "${MODEL_ARGS[@]}" --backend compile \
  "${SMOKE_ARGS[@]}" --budget 100 --out "$D/models-compile"
summarize
