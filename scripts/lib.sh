# Shared by scripts/train.sh, scripts/eval.sh and scripts/slurm/train.sbatch (sourced, not run).

# The repository root (this file is scripts/lib.sh), and unbuffered Python output, so that the training and
# evaluation logs reach the terminal or the SLURM output file as they are written.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONUNBUFFERED=1

# visible_gpus: the number of GPUs nvidia-smi lists, or 1 on a machine without GPUs (one CPU process).
visible_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | wc -l
  else
    echo 1
  fi
}

# launch_args "$@": reads the arguments of scripts/train.sh and scripts/eval.sh, `TARGET [NUM_GPUS] [more ...]`.
# With no argument, or -h / --help, prints the script's header comment (its usage) and exits 2. Otherwise sets
# target (the first argument), gpus (NUM_GPUS when the second argument is a number, else visible_gpus) and the
# array rest (the arguments after those).
launch_args() {
  if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
    exit 2
  fi
  target=$1
  shift
  if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
    gpus=$1
    shift
  else
    gpus=$(visible_gpus)
  fi
  rest=("$@")
}

# run_state FILE: the "state" the trainer wrote into a status.json (running, preempted, completed, failed),
# or nothing when the file is missing or empty. train.py writes it to $AN_STATUS_FILE as well as to the
# run folder; the launch scripts read it because torchrun reports a preempted run (exit 75) as exit 1.
run_state() {
  [[ -s "$1" ]] || return 0
  sed -n 's/^ *"state": *"\([a-z]*\)".*/\1/p' "$1" | head -n 1
}

# Signals torchrun passes on to the training processes (it dies of SIGUSR1 otherwise), and how long it waits
# for them to checkpoint and exit before it SIGKILLs them (torchrun's default is 30 s). Versions of torchrun
# older than these variables ignore them.
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}

# wait_child PID: waits until the child PID has exited and returns its exit status. A bare `wait` returns early
# (status > 128) when a trapped signal arrives, which is how the launch scripts forward signals to their child.
wait_child() {
  local rc=0
  wait "$1" || rc=$?
  while kill -0 "$1" 2>/dev/null; do
    rc=0
    wait "$1" || rc=$?
  done
  return "$rc"
}
