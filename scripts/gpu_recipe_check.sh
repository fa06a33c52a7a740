#!/usr/bin/env bash
# The GPU half of the recipe benchmark (bench/time_to_quality.py), for a machine with one CUDA GPU.
#
#   WORK=gpuwork/ttq EVAL=gpuwork/xnli_test_ko.txt TUNE=gpuwork/kor_Hang.dev bash scripts/gpu_recipe_check.sh OUTDIR
#
# WORK holds the bench's tokenizer and shards, prepared beforehand on any machine (the bench's own `prepare` step:
# a GPU machine without the shared data can still run this). In order, as long as the time allows (DEADLINE, in
# seconds from the start, default 540):
#   1. scripts/gpu_check.sh: gpu-124m throughput, MFU, peak memory, fused attention kernels (STEPS=100).
#   2. the ~20M model at 40x the bench's CPU budget (8.2M tokens, 0.4 tokens/param), seeds 1 and 2: the check
#      that our recipe still wins on a run far longer than any this project's CPUs can afford.
#   3. the ~20M model at 10x (2.05M tokens), seeds 1 and 2.   4. the cpu-tiny shape at 1x, seeds 1 and 2.
# Each step runs its two seeds as two processes at the same time, so both sides of a comparison (the baseline's
# learning-rate sweep, then our run) share the GPU with the same neighbour; every finished run is cached
# (--cache), so a step cut off by the deadline still leaves its finished runs, and the last calls combine what
# is there (--cached-only) into one JSON per budget. Everything lands in OUTDIR.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:?usage: gpu_recipe_check.sh OUTDIR}
mkdir -p "$OUTDIR"
PY=${PY:-python3}
WORK=${WORK:-gpuwork/ttq}
EVAL=${EVAL:?EVAL: the held-out Korean text}
TUNE=${TUNE:?TUNE: the tuning text (FLORES-200 dev, Korean)}
DEADLINE=${DEADLINE:-540}
T0=$SECONDS
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
left() { echo $((DEADLINE - (SECONDS - T0))); }
TTQ=(bench/time_to_quality.py --device cuda --cache --work "$WORK" --eval-text "$EVAL" --tune-text "$TUNE")

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUTDIR/gpu.txt"

# 1. the GPU path itself
STEPS=${STEPS:-100} OUT=/tmp/kfoundry-gpu-check timeout $(( $(left) / 3 )) bash scripts/gpu_check.sh \
  >"$OUTDIR/gpu_check.log" 2>&1
echo "gpu_check rc=$? at $((SECONDS - T0))s" | tee -a "$OUTDIR/gpu.txt"

# 2-4. two seeds side by side per step, cut off 40 s before the deadline
pair() {  # pair NAME ARGS...: seeds 1 and 2 at once
  local name=$1; shift
  local budget=$(( $(left) - 40 ))
  if [ "$budget" -lt 30 ]; then echo "skip $name: ${budget}s left" | tee -a "$OUTDIR/gpu.txt"; return; fi
  for seed in 1 2; do
    timeout "$budget" $PY "${TTQ[@]}" "$@" --seeds $seed >"$OUTDIR/$name-s$seed.log" 2>&1 &
  done
  wait
  echo "$name done at $((SECONDS - T0))s" | tee -a "$OUTDIR/gpu.txt"
}
# the baseline's best rate falls as the budget grows (2e-3 at 1x, 5e-4 at 4x on the CPU): sweep lower here
LR40=1.25e-4,2.5e-4,5e-4,1e-3,2e-3
pair 20m-40x --sizes 20m --budget-mult 40 --baseline-lrs $LR40
pair 20m-10x --sizes 20m --budget-mult 10
pair tiny-1x --sizes tiny

# combine what finished
$PY "${TTQ[@]}" --cached-only --sizes 20m --seeds 1,2 --budget-mult 40 --baseline-lrs $LR40 --json "$OUTDIR/ttq_20m_40x.json" \
  >"$OUTDIR/combine.log" 2>&1
$PY "${TTQ[@]}" --cached-only --sizes 20m --seeds 1,2 --budget-mult 10 --json "$OUTDIR/ttq_20m_10x.json" \
  >>"$OUTDIR/combine.log" 2>&1
$PY "${TTQ[@]}" --cached-only --sizes tiny --seeds 1,2 --json "$OUTDIR/ttq_tiny_1x.json" >>"$OUTDIR/combine.log" 2>&1
tail -n 3 "$OUTDIR/combine.log"
echo "total $((SECONDS - T0))s"
