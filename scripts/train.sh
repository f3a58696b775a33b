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
#
# Exit status: the trainer's, and 75 when a signal (SIGTERM, SIGINT, SIGUSR1; to this script or its whole
# process group) stopped the run with a checkpoint: run the same command again to resume. torchrun
# itself reports such a stop as 1; the script reads the trainer's status file instead.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
launch_args "$@"
config=$target
set -- "${rest[@]}"

cpus=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / gpus > 1 ? cpus / gpus / 2 : 1 ))}

AN_STATUS_FILE=$(mktemp "${TMPDIR:-/tmp}/an-train-status.XXXXXX")
export AN_STATUS_FILE
trap 'rm -f "$AN_STATUS_FILE"' EXIT

# shellcheck disable=SC2086
torchrun --standalone --nnodes 1 --nproc_per_node "$gpus" ${TORCHRUN_ARGS:-} \
  "$repo/train.py" --config "$config" "$@" &
pid=$!
# torchrun passes a SIGTERM/SIGINT on to the training processes, which checkpoint and exit 75. A signal sent
# to the whole group reaches torchrun directly as well; a second delivery is harmless.
trap 'kill -TERM "$pid" 2>/dev/null || true' TERM USR1
trap 'kill -INT "$pid" 2>/dev/null || true' INT
rc=0
wait_child "$pid" || rc=$?
if [[ "$(run_state "$AN_STATUS_FILE")" == preempted ]]; then
  echo "train.sh: the run stopped with a checkpoint (preempted); run the same command to resume." >&2
  exit 75
fi
exit "$rc"
