"""Helpers for tests that run the trainer as real processes: commands, environments, waiting on a run, the
processes a launcher started, and the logs and checkpoints a run leaves."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from engine import checkpoint as ck

REPO = Path(__file__).resolve().parent.parent


def env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher and fault-injection variables, one thread, unbuffered output,
    the repository importable; ``extra`` on top."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "AN_FAULT", "AN_STATUS_FILE"))
    }
    return {**clean, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **extra}


def train_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--config", str(config), *args]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: float = 600, cwd: Path = REPO, **extra_env: str) -> subprocess.CompletedProcess:
    """Runs ``cmd`` to the end in :func:`env` (plus ``extra_env``), capturing its output."""
    return subprocess.run(cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def run_ok(cmd: list[str], timeout: float = 600, cwd: Path = REPO, **extra_env: str) -> str:
    """:func:`run`, checking that ``cmd`` succeeded (showing its output if not); returns its stdout."""
    result = run(cmd, timeout, cwd, **extra_env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def start(cmd: list[str], new_session: bool = True, **extra_env: str) -> subprocess.Popen:
    """Starts ``cmd`` in :func:`env` (plus ``extra_env``), stdout and stderr in one pipe; with ``new_session``
    as the leader of a new process group (so that the test can signal the whole group)."""
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env(**extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
    )


def wait_for(proc: subprocess.Popen, log_file: Path, text: str, timeout: float = 300) -> None:
    """Waits until ``text`` is in ``log_file``; fails (with the output) if ``proc`` ends or ``timeout`` passes."""
    deadline = time.time() + timeout
    while not (log_file.exists() and text in log_file.read_text()):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, f"the run never logged {text!r}"
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    """The pids of the processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def read_log(run_dir: Path) -> list[dict]:
    """The records of a run folder's log.jsonl."""
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def tensors(state, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state dict, by its path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list) else []
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}.{key}").items()}


def assert_bitwise_equal(a_path: Path, b_path: Path, keys=("model", "optimizer")) -> None:
    """Two checkpoints at the same point (epoch, step, update) with bit-identical tensors under ``keys``."""
    a, b = ck.load_checkpoint(a_path), ck.load_checkpoint(b_path)
    assert (a["epoch"], a["step_in_epoch"], a["global_update"]) == (b["epoch"], b["step_in_epoch"], b["global_update"])
    for key in keys:
        ta, tb = tensors(a[key]), tensors(b[key])
        assert ta.keys() == tb.keys(), key
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{key}{k} differs"
