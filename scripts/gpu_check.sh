#!/usr/bin/env bash
# GPU check (for a machine with a CUDA GPU): bf16 training throughput, MFU and peak memory of the 124M model.
#
#   bash scripts/gpu_check.sh            # ~2-4 minutes on an H100/H200, most of it tokenizer + torch.compile
#
# Runs the gpu-124m preset (12 layers, width 768, 32k vocabulary, seq 1024) with bf16 autocast and torch.compile for
# 300 steps of 32 x 1024 tokens on the bundled starter corpus (a tokenizer of 8k is trained on it; the model keeps
# its 32k embedding), then prints tokens/s, MFU against the card's datasheet peak (null, with the reason, for a card
# missing from the peak table in kfoundry/train/mfu.py) and peak memory. Last, it checks that pretraining and SFT
# run fused attention kernels (flash / cuDNN / FlashAttention varlen), never SDPA's math kernel
# (scripts/check_attention_kernels.py); the script fails if they do not.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/kfoundry-gpu-check}
STEPS=${STEPS:-300}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')"
rm -rf "$OUT/run"
$PY -m kfoundry pretrain --out "$OUT/run" --preset gpu-124m --corpus starter --no-progress \
  --set data.vocab_size=8192 --set data.split_chars=4000 \
  --set train.max_steps="$STEPS" --set train.tokens_per_step=0 --set train.micro_batch_size=32 \
  --set train.warmup_steps=30 --set train.eval_every="$STEPS" --set train.ckpt_every="$STEPS" \
  --set train.log_every=25 --set train.compile=true
$PY scripts/gpu_check_summary.py "$OUT/run/metrics.jsonl"
PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} $PY scripts/check_attention_kernels.py --device cuda --preset gpu-124m
