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

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
launch_args "$@"
checkpoint=$target
set -- "${rest[@]}"
exec torchrun --standalone --nnodes 1 --nproc_per_node "$gpus" "$repo/eval.py" --checkpoint "$checkpoint" "$@"
