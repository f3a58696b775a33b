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
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
  gpus=$1
  shift
else
  gpus=$(visible_gpus)
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONUNBUFFERED=1
exec torchrun --standalone --nnodes 1 --nproc_per_node "$gpus" "$repo/eval.py" --checkpoint "$checkpoint" "$@"
