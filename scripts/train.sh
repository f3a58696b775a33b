#!/usr/bin/env bash
# Train on one node with torchrun (standalone rendezvous).
#
#   scripts/train.sh CONFIG [NUM_GPUS] [section.key=value ...]
#
#   scripts/train.sh resnet50_an.yaml            # all visible GPUs
#   scripts/train.sh resnet50_an.yaml 4 data.root=/data/imagenet train.output_dir=runs/r50_an_4gpu
#
# NUM_GPUS defaults to the number of visible GPUs (1 process on a CPU-only machine). The config's
# per-GPU batch is kept, so the global batch and the scaled LR follow the GPU count (train.py logs
# both, and warns when they differ from the recipe's dist.recipe_gpus). Re-running the same command
# resumes from OUTPUT_DIR/last.pth. Extra torchrun flags: TORCHRUN_ARGS="--max-restarts 3".
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
config=$1
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
cpus=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / gpus > 1 ? cpus / gpus / 2 : 1 ))}
export PYTHONUNBUFFERED=1

# shellcheck disable=SC2086
exec torchrun --standalone --nnodes 1 --nproc_per_node "$gpus" ${TORCHRUN_ARGS:-} \
  "$repo/train.py" --config "$config" "$@"
