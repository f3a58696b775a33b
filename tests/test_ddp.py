"""Multi-process training on gloo (CPU): torchrun with 2 workers, and 2 torchrun agents acting as 2 nodes.

Each test launches real processes with torchrun, so it checks the same path users run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ck
from tests.conftest import tiny_config
from tests.processes import children, free_port, read_json, read_log, run_ok, start, tensors, torchrun, wait_for

pytestmark = pytest.mark.slow

# GroupNorm: no batch statistics, so 2 ranks x batch B must equal 1 process x batch 2B.
BN_FREE = {"model": {"norm": "gn", "norm_kwargs": {"groups": 4}}}


def test_two_ranks_match_one_process_with_the_double_batch(tmp_path):
    two = tiny_config(tmp_path / "two", **BN_FREE)
    one = tiny_config(tmp_path / "one", data={"batch_size": 16}, **BN_FREE)
    run_ok(["bash", "scripts/train.sh", str(two), "2"])  # the single-node launcher: torchrun, 2 workers
    run_ok([sys.executable, "train.py", "--config", str(one)])
    log = read_log(tmp_path / "two" / "run")
    assert all(r["ranks_consistent"] for r in log)  # identical weights on both ranks after every epoch
    assert all(r["val_count"] == 21 for r in log)  # odd validation set counted exactly once across ranks
    a = ck.load_checkpoint(tmp_path / "two" / "run" / "last.pth")
    b = ck.load_checkpoint(tmp_path / "one" / "run" / "last.pth")
    assert a["global_update"] == b["global_update"] == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    for ra, rb in zip(read_log(tmp_path / "two" / "run"), read_log(tmp_path / "one" / "run")):
        assert ra["val_top1"] == rb["val_top1"]

    # eval.py under torchrun with 2 workers: every image once, the trainer's number.
    out = run_ok(["bash", "scripts/eval.sh", str(tmp_path / "two" / "run" / "last.pth"), "2"])
    evaluated = json.loads(out.strip().splitlines()[-1])
    assert evaluated["count"] == 21 and evaluated["world_size"] == 2 and evaluated["top1"] == log[-1]["val_top1"]


def worker_pids(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the training processes started by a torchrun agent (read from /proc)."""
    found = {}
    for pid in children(agent_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = pid
    return found


def start_two_ranks(config: Path, until: str) -> tuple[subprocess.Popen, list[str], dict[int, int]]:
    """Starts ``train.py --config config`` under torchrun with 2 workers and waits until ``until`` is in train.log.

    Returns the torchrun process, its command line and the workers' pids by rank.
    """
    cmd = torchrun("--standalone", "--nproc_per_node", "2", "train.py", "--config", str(config))
    proc = start(cmd, new_session=False)
    wait_for(proc, config.parent / "run" / "train.log", until, timeout=180)
    pids = worker_pids(proc.pid)
    assert sorted(pids) == [0, 1]
    return proc, cmd, pids


def test_sigterm_to_one_rank_stops_all_ranks_at_the_same_step_and_resumes_exactly(tmp_path):
    sections = {"data": {"synthetic_train_size": 240}, "log": {"interval": 1, "progress": "lines"}}
    straight = tiny_config(tmp_path / "a", **sections)
    run_ok(torchrun("--standalone", "--nproc_per_node", "2", "train.py", "--config", str(straight)))

    proc, cmd, pids = start_two_ranks(tiny_config(tmp_path / "b", **sections), until="epoch 1/2 [4/15]")
    os.kill(pids[1], signal.SIGTERM)  # only rank 1 is told; rank 0 must stop at the same step
    out, _ = proc.communicate(timeout=180)
    assert "exitcode  : 75" in out or "exitcode: 75" in out.replace(" ", ""), out
    status = read_json(tmp_path / "b" / "run" / "status.json")
    assert status["state"] == "preempted" and status["epoch"] == 0
    mid = ck.load_checkpoint(tmp_path / "b" / "run" / "last.pth")
    assert mid["step_in_epoch"] == status["step"] and 4 <= status["step"] < 15
    assert len(mid["rng"]) == 2  # every rank's RNG state, so each resumes its own stream

    run_ok(cmd)  # the same command resumes
    a = ck.load_checkpoint(tmp_path / "a" / "run" / "last.pth")
    b = ck.load_checkpoint(tmp_path / "b" / "run" / "last.pth")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["val_top1"] for r in read_log(tmp_path / "a" / "run")] == [
        r["val_top1"] for r in read_log(tmp_path / "b" / "run")
    ]


def test_hard_kill_between_timed_checkpoints_of_two_ranks_resumes_bitwise(tmp_path):
    """Timed checkpoints of a 2-rank run hold both ranks' RNG states: SIGKILL, resume, same final weights.

    Mixup draws from each rank's own NumPy generator, so a resume that restored only rank 0's RNG state (or
    reseeded the others) would train on other mixes and end with other weights.
    """
    sections = {
        "data": {"synthetic_train_size": 240},  # 15 steps per epoch per rank
        "train": {"mixup": 0.4, "save_minutes": 1e-9},  # a timed checkpoint at every check
        "dist": {"signal_check_every": 3},
        "log": {"interval": 1, "progress": "lines"},
    }
    straight = tiny_config(tmp_path / "a", **sections)
    run_ok(torchrun("--standalone", "--nproc_per_node", "2", "train.py", "--config", str(straight)))

    config = tiny_config(tmp_path / "b", **sections)
    proc, cmd, pids = start_two_ranks(config, until="epoch 1/2 [8/15]")  # past the timed saves at steps 3 and 6
    for pid in (pids[0], pids[1], proc.pid):  # the whole job dies at once, as when a node is lost
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    mid = ck.load_checkpoint(tmp_path / "b" / "run" / "last.pth")
    assert mid["epoch"] == 0 and mid["step_in_epoch"] >= 6 and mid["step_in_epoch"] % 3 == 0  # a timed checkpoint
    assert len(mid["rng"]) == 2 and not torch.equal(mid["rng"][0]["torch"], mid["rng"][1]["torch"])

    out = run_ok(cmd)  # the same command resumes from the timed checkpoint
    assert f"epoch 0, step {mid['step_in_epoch']}" in out and "reseeded" not in out
    a = ck.load_checkpoint(tmp_path / "a" / "run" / "last.pth")
    b = ck.load_checkpoint(tmp_path / "b" / "run" / "last.pth")
    assert a["global_update"] == b["global_update"] == 30
    for key in ("model", "optimizer"):
        flat_a, flat_b = tensors(a[key]), tensors(b[key])
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), f"{key}: {k}"


def test_two_torchrun_agents_as_two_nodes(tmp_path):
    """Two agents on this machine play two nodes: c10d rendezvous on 127.0.0.1, gloo, run to the end."""
    config = tiny_config(tmp_path, **BN_FREE)
    port = free_port()
    agents = [
        start(
            torchrun(
                "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-node-test", "--max-restarts", "0",
                "train.py", "--config", str(config),
            ),
            new_session=False,
        )
        for _ in range(2)
    ]  # fmt: skip
    outputs = [a.communicate(timeout=600)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(outputs)
    log = read_log(tmp_path / "run")
    assert len(log) == 2 and all(r["ranks_consistent"] for r in log) and all(r["val_count"] == 21 for r in log)
    assert "2 process(es) on cpu" in (tmp_path / "run" / "train.log").read_text()
