"""scripts/slurm/train.sbatch logic, run with fake SLURM variables and stand-in srun/scontrol on PATH."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"

FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in for srun: records its arguments and launch environment, then behaves as FAKE_SRUN_MODE says.
{ printf '%s\\n' "$@"; echo "--ENV--"; echo "MASTER_ADDR=$MASTER_ADDR"; echo "MASTER_PORT=$MASTER_PORT";
  echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"; } > "$RECORD_DIR/srun.args"
# FAKE_STATE: the state the trainer's rank 0 writes into $AN_STATUS_FILE before the launcher exits.
write_state() {
  [[ -z "${FAKE_STATE:-}" ]] || printf '{\n "state": "%s",\n "time": "x"\n}\n' "$FAKE_STATE" > "$AN_STATUS_FILE"
}
case "${FAKE_SRUN_MODE:-exit}" in
  exit) write_state; exit "${FAKE_SRUN_RC:-0}" ;;
  wait_for_term)
    trap 'echo TERM >> "$RECORD_DIR/srun.signals"; write_state; exit "${FAKE_SRUN_RC:-75}"' TERM
    touch "$RECORD_DIR/srun.started"
    for _ in $(seq 1 300); do sleep 0.1; done
    exit 0 ;;
esac
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
# Stand-in for scontrol: expands node lists like node[001-002] and records requeue requests.
if [[ "$1" == "show" && "$2" == "hostnames" ]]; then
  list=$3
  if [[ "$list" =~ ^([a-z]+)\\[([0-9]+)-([0-9]+)\\]$ ]]; then
    p=${BASH_REMATCH[1]}; a=${BASH_REMATCH[2]}; b=${BASH_REMATCH[3]}; w=${#a}
    for ((i=10#$a; i<=10#$b; i++)); do printf "%s%0${w}d\\n" "$p" "$i"; done
  else
    tr ',' '\\n' <<< "$list"
  fi
elif [[ "$1" == "requeue" ]]; then
  echo "requeue $2" >> "$RECORD_DIR/scontrol.log"
fi
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "OMP_", "MODE"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        RECORD_DIR=str(tmp_path),
        SLURM_JOB_ID="123456",
        SLURM_JOB_NODELIST="node[001-002]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_ON_NODE="4",
        SLURM_CPUS_ON_NODE="32",
        SLURM_CPUS_PER_TASK="32",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_SUBMIT_DIR=str(REPO),
        STATUS_FILE=str(tmp_path / "status.json"),
    )
    return env, tmp_path


def run_sbatch(env, *args, **extra_env):
    return subprocess.run(
        ["bash", str(SBATCH), *args], env={**env, **extra_env}, capture_output=True, text=True, timeout=60
    )


def recorded_args(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    lines = (tmp_path / "srun.args").read_text().splitlines()
    cut = lines.index("--ENV--")
    env = dict(line.split("=", 1) for line in lines[cut + 1 :])
    return lines[:cut], env


def test_torchrun_mode_derives_rendezvous_from_allocation(fake_slurm):
    env, tmp = fake_slurm
    result = run_sbatch(env, "resnet50_an.yaml", "optim.lr=0.2", OUTPUT_DIR="/shared/runs/r50")
    assert result.returncode == 0, result.stderr
    args, launch_env = recorded_args(tmp)
    assert args[:5] == ["--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=32", "torchrun"]
    assert "--nnodes=2" in args and "--nproc_per_node=4" in args and "--rdzv_backend=c10d" in args
    assert "--rdzv_endpoint=node001:23456" in args  # head = first node; port = 20000 + job id % 20000
    assert "--rdzv_id=123456" in args
    tail = args[args.index(str(REPO / "train.py")) :]
    assert tail == [
        str(REPO / "train.py"),
        "--config",
        "resnet50_an.yaml",
        "optim.lr=0.2",
        "train.output_dir=/shared/runs/r50",
    ]
    assert launch_env == {"MASTER_ADDR": "node001", "MASTER_PORT": "23456", "OMP_NUM_THREADS": "4"}
    assert not (tmp / "scontrol.log").exists()  # a clean finish does not requeue


def test_srun_mode_one_task_per_gpu(fake_slurm):
    env, tmp = fake_slurm
    bad = run_sbatch(env, "resnet50_an.yaml", MODE="srun")
    assert bad.returncode == 2 and "needs --ntasks-per-node (1) equal to the GPUs per node (4)" in bad.stderr
    result = run_sbatch(env, "resnet50_an.yaml", MODE="srun", SLURM_NTASKS_PER_NODE="4(x2)", SLURM_GPUS_ON_NODE="")
    # SLURM_GPUS_ON_NODE empty: fall back to SLURM_GPUS_PER_NODE in its "type:count" form.
    assert result.returncode == 2  # no GPU count known -> 1 GPU, which mismatches 4 tasks
    result = run_sbatch(
        env,
        "resnet50_an.yaml",
        MODE="srun",
        SLURM_NTASKS_PER_NODE="4(x2)",
        SLURM_GPUS_ON_NODE="",
        SLURM_GPUS_PER_NODE="h100:4",
    )
    assert result.returncode == 0, result.stderr
    args, launch_env = recorded_args(tmp)
    assert args[:4] == ["--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=4", "python"]
    assert args[4:] == [str(REPO / "train.py"), "--config", "resnet50_an.yaml"]
    assert launch_env["MASTER_ADDR"] == "node001" and launch_env["MASTER_PORT"] == "23456"


def test_dry_run_and_usage_errors(fake_slurm, tmp_path):
    env, tmp = fake_slurm
    result = run_sbatch(env, "resnet50_an.yaml", DRY_RUN="1", PORT="29999")
    assert result.returncode == 0 and "--rdzv_endpoint=node001:29999" in result.stdout
    assert not (tmp / "srun.args").exists()
    assert run_sbatch(env).returncode == 2
    result = run_sbatch(env, "x.yaml", REPO=str(tmp_path))
    assert result.returncode == 2 and "no train.py" in result.stderr
    result = run_sbatch(env, "x.yaml", MODE="mpi")
    assert result.returncode == 2 and "unknown MODE" in result.stderr


def test_exit_status_75_requeues_and_failures_do_not(fake_slurm):
    env, tmp = fake_slurm
    result = run_sbatch(env, "resnet50_an.yaml", FAKE_SRUN_RC="75")
    assert result.returncode == 0 and (tmp / "scontrol.log").read_text() == "requeue 123456\n"
    (tmp / "scontrol.log").unlink()
    result = run_sbatch(env, "resnet50_an.yaml", FAKE_SRUN_RC="1")
    assert result.returncode == 1 and not (tmp / "scontrol.log").exists()
    result = run_sbatch(env, "resnet50_an.yaml", FAKE_SRUN_RC="75", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    assert result.returncode == 75 and not (tmp / "scontrol.log").exists()


@pytest.mark.parametrize(
    ("state", "rc", "requeued"),
    [
        ("preempted", 1, True),  # torchrun reports a worker that exited 75 as a failure (exit 1)
        ("preempted", 75, True),
        ("failed", 1, False),
        ("completed", 0, False),
        ("running", 1, False),  # crashed without a checkpoint of its own: not a preemption
    ],
)
def test_requeue_is_decided_from_the_trainers_status_file(fake_slurm, state, rc, requeued):
    env, tmp = fake_slurm
    (tmp / "status.json").write_text('{\n "state": "preempted"\n}\n')  # left by the previous start of the job
    result = run_sbatch(env, "resnet50_an.yaml", FAKE_STATE=state, FAKE_SRUN_RC=str(rc))
    assert (tmp / "scontrol.log").exists() == requeued, result.stdout + result.stderr
    assert result.returncode == (0 if requeued else rc)
    assert f"state {state}" in result.stdout


def test_a_stale_status_file_is_ignored(fake_slurm):
    env, tmp = fake_slurm
    (tmp / "status.json").write_text('{\n "state": "preempted"\n}\n')  # left by the previous start of the job
    result = run_sbatch(env, "resnet50_an.yaml", FAKE_SRUN_RC="1")  # this start wrote nothing
    assert result.returncode == 1 and "state unknown" in result.stdout


def signal_sbatch(fake_slurm, **extra_env) -> tuple[int, str, str]:
    """Runs train.sbatch with a fake srun that waits; once srun runs, SIGUSR1s the batch shell (what
    `#SBATCH --signal=B:USR1@180` delivers to it). Returns the exit status, stdout and stderr."""
    env, tmp = fake_slurm
    proc = subprocess.Popen(
        ["bash", str(SBATCH), "resnet50_an.yaml"],
        env={**env, "FAKE_SRUN_MODE": "wait_for_term", **extra_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 20
    while not (tmp / "srun.started").exists():
        assert time.time() < deadline, "fake srun never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


def test_a_run_that_failed_is_not_requeued_even_when_signalled(fake_slurm):
    tmp = fake_slurm[1]
    returncode, out, err = signal_sbatch(fake_slurm, FAKE_STATE="failed", FAKE_SRUN_RC="1")
    assert returncode == 1 and not (tmp / "scontrol.log").exists(), out + err


def test_time_limit_signal_is_forwarded_then_job_requeued(fake_slurm):
    tmp = fake_slurm[1]
    returncode, out, err = signal_sbatch(fake_slurm)
    assert returncode == 0, err
    assert (tmp / "srun.signals").read_text() == "TERM\n"  # forwarded to the training processes
    assert (tmp / "scontrol.log").read_text() == "requeue 123456\n"
    assert "signal received" in out


def test_eval_sbatch_launches_torchrun_on_the_allocation(fake_slurm):
    env, tmp = fake_slurm
    script = REPO / "scripts" / "slurm" / "eval.sbatch"
    result = subprocess.run(
        ["bash", str(script), "runs/r50/best.pth", "--ema"], env={**env, "DRY_RUN": "1"}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "torchrun --standalone --nproc_per_node=4" in result.stdout
    assert f"{REPO / 'eval.py'} --checkpoint runs/r50/best.pth --ema" in result.stdout
    result = subprocess.run(["bash", str(script), "runs/r50/best.pth"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    args, _ = recorded_args(tmp)
    assert args[:3] == ["--kill-on-bad-exit=1", "--ntasks=1", "torchrun"]
    assert args[-3:] == [str(REPO / "eval.py"), "--checkpoint", "runs/r50/best.pth"]
    assert subprocess.run(["bash", str(script)], env=env, capture_output=True).returncode == 2
