#!/usr/bin/env bash
# Evaluate a checkpoint on one node (every validation image exactly once, across all GPUs).
#
#   scripts/eval.sh CHECKPOINT [NUM_GPUS] [eval.py options ...]
#
#   scripts/eval.sh runs/resnet50_an/best.pth
#   scripts/eval.sh runs/resnet50_an/best.pth 8 --data-root /data/imagenet --ema
#
# Prints one JSON line (top1, top5, count, ...) and writes it next to the checkpoint.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
checkpoint=$1
shift
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
  gpus=$1
  shift
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | wc -l)
else
  gpus=1
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONUNBUFFERED=1
exec torchrun --standalone --nnodes 1 --nproc_per_node "$gpus" "$repo/eval.py" --checkpoint "$checkpoint" "$@"
