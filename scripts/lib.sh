# Shared by scripts/train.sh and scripts/eval.sh (sourced, not run).

# visible_gpus: the number of GPUs nvidia-smi lists, or 1 on a machine without GPUs (one CPU process).
visible_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | wc -l
  else
    echo 1
  fi
}
