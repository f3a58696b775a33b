"""What survives what: real signals, real launchers, kills inside every window of a save, a full disk,
unwritable output folders, two runs in one folder, and a diverged step before a timed save.

Faults inside the trainer are injected with ``AN_FAULT`` (``engine/faults.py``): the process SIGKILLs
itself, or a write fails with ENOSPC, at a named point. The README's "What survives what" table lists
these tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

import engine.build
import eval as eval_script
import train
from engine import checkpoint as ck
from engine.distributed import EXIT_PREEMPTED
from tests.conftest import tiny_config
from tests.image_folders import make_image_folder
from tests.processes import (
    REPO,
    assert_bitwise_equal,
    children,
    read_json,
    read_log,
    run,
    run_ok,
    start,
    torchrun,
    train_cmd,
    wait_for,
)

# ----------------------------------------------------------------------------------------------------
# Helpers: processes, logs, checkpoints.
# ----------------------------------------------------------------------------------------------------


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob(".*.tmp"))


def one_paragraph_error(text: str) -> None:
    assert "Traceback" not in text, text
    assert text.strip() and "\n\n" not in text.strip(), text


# ----------------------------------------------------------------------------------------------------
# Preemption as launchers deliver it: the signal reaches the loader workers too.
# ----------------------------------------------------------------------------------------------------

JPEG_STEPS = 24  # 96 training images in batches of 4


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpeg") / "ds"
    return make_image_folder(root, train_per_class=32, val_per_class=4, size=(40, 36))


def jpeg_config(tmp_path: Path, root: Path) -> Path:
    """A small model on JPEG files decoded by 2 DataLoader worker processes (the torch backend)."""
    return tiny_config(
        tmp_path,
        model={"name": "resnet18", "norm": "bn", "num_classes": 3},
        data={"backend": "torch", "root": str(root), "workers": 2, "batch_size": 4, "img_size": 32},
        log={"interval": 1, "progress": "lines"},
    )


@pytest.fixture(scope="module")
def jpeg_reference(tmp_path_factory, jpeg_root) -> Path:
    """The unbroken one-process run that every interrupted one-process run must end equal to."""
    tmp = tmp_path_factory.mktemp("jpeg_reference")
    run_ok(train_cmd(jpeg_config(tmp, jpeg_root)))
    return tmp / "run"


def check_preempted_mid_run(run_dir: Path, steps: int, out: str) -> None:
    status = read_json(run_dir / "status.json")
    assert status["state"] == "preempted", out
    mid = ck.load_checkpoint(run_dir / "last.pth")
    assert (mid["epoch"], mid["step_in_epoch"]) == (status["epoch"], status["step"])
    assert 3 <= mid["epoch"] * steps + mid["step_in_epoch"] < 2 * steps, "stopped before the signal, or never"
    assert "killed by signal" not in out, out


@pytest.mark.slow
def test_group_sigterm_from_timeout_checkpoints_exits_75_and_resumes_bitwise(tmp_path, jpeg_root, jpeg_reference):
    config = jpeg_config(tmp_path, jpeg_root)
    proc = start(["timeout", "900", *train_cmd(config)])
    wait_for(proc, tmp_path / "run" / "train.log", f"[3/{JPEG_STEPS}]")
    proc.send_signal(signal.SIGTERM)  # timeout passes it on to its whole process group: trainer and loader workers
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, out
    check_preempted_mid_run(tmp_path / "run", JPEG_STEPS, out)
    run_ok(train_cmd(config))  # the same command resumes
    assert_bitwise_equal(jpeg_reference / "last.pth", tmp_path / "run" / "last.pth")


@pytest.mark.slow
def test_sigterm_to_torchrun_one_rank_checkpoints_and_resumes_bitwise(tmp_path, jpeg_root, jpeg_reference):
    """torchrun passes a SIGTERM on to each worker's whole process group (os.killpg), loader workers included."""
    config = jpeg_config(tmp_path, jpeg_root)
    cmd = torchrun("--standalone", "--nproc_per_node", "1", str(REPO / "train.py"), "--config", str(config))
    proc = start(cmd)
    wait_for(proc, tmp_path / "run" / "train.log", f"[3/{JPEG_STEPS}]")
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out  # torchrun reports a stopped worker as a failure: status.json tells
    check_preempted_mid_run(tmp_path / "run", JPEG_STEPS, out)
    run_ok(cmd)
    assert_bitwise_equal(jpeg_reference / "last.pth", tmp_path / "run" / "last.pth")


@pytest.mark.slow
def test_group_sigterm_to_train_sh_with_two_ranks_exits_75_and_resumes_bitwise(tmp_path, jpeg_root):
    """scripts/train.sh (torchrun, 2 ranks, 2 loader workers each): the script exits 75 from status.json."""
    straight = jpeg_config(tmp_path / "a", jpeg_root)
    run_ok(["bash", "scripts/train.sh", str(straight), "2"])

    config = jpeg_config(tmp_path / "b", jpeg_root)
    cmd = ["bash", "scripts/train.sh", str(config), "2"]
    proc = start(cmd)
    steps = JPEG_STEPS // 2
    wait_for(proc, tmp_path / "b" / "run" / "train.log", f"[3/{steps}]")
    os.killpg(proc.pid, signal.SIGTERM)  # the script, torchrun; torchrun passes it on to the ranks' groups
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, out
    check_preempted_mid_run(tmp_path / "b" / "run", steps, out)
    assert len(ck.load_checkpoint(tmp_path / "b" / "run" / "last.pth")["rng"]) == 2
    run_ok(cmd)
    assert_bitwise_equal(tmp_path / "a" / "run" / "last.pth", tmp_path / "b" / "run" / "last.pth")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_loader_workers_ignore_sigterm_and_die_with_the_trainer(tmp_path, jpeg_root):
    config = jpeg_config(tmp_path, jpeg_root)
    proc = start(train_cmd(config))
    try:
        wait_for(proc, tmp_path / "run" / "train.log", f"[2/{JPEG_STEPS}]")
        workers = children(proc.pid)
        assert len(workers) >= 2
        for pid in workers:
            os.kill(pid, signal.SIGTERM)  # what a group signal does to them
        time.sleep(1.0)
        assert all(alive(pid) for pid in workers), "a loader worker died of SIGTERM"
        proc.kill()  # SIGKILL to the trainer alone: its workers must not outlive it
        proc.communicate(timeout=60)
        deadline = time.time() + 3
        while any(alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in workers), "loader workers outlived the trainer"
    finally:
        if proc.poll() is None:
            proc.kill()


# ----------------------------------------------------------------------------------------------------
# Kills inside every window of an epoch's save: best.pth never behind summary.json / log.jsonl.
# ----------------------------------------------------------------------------------------------------

BEST_SECTIONS = {"sched": {"epochs": 3}, "optim": {"lr": 0.4}}  # improves at every epoch


@pytest.fixture(scope="module")
def best_reference(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("best_reference")
    run_ok(train_cmd(tiny_config(tmp, **BEST_SECTIONS)))
    return tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize("point", ["write:last.pth", "save:last", "save:best", "epoch:logged", "run:summary"])
def test_a_kill_inside_a_save_leaves_a_consistent_resumable_folder(tmp_path, best_reference, point, capsys):
    improved = [r["epoch"] for r in read_log(best_reference) if r["best_epoch"] == r["epoch"]]
    assert len(improved) >= 2  # so best.pth exists before the kill, which hits the last improvement
    nth = {"save:best": len(improved), "run:summary": 1}.get(point, improved[-1])
    config = tiny_config(tmp_path, **BEST_SECTIONS)
    killed = run(train_cmd(config), AN_FAULT=f"kill:{point}@{nth}")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    run_ok(train_cmd(config))  # the same command resumes and finishes

    run_dir = tmp_path / "run"
    assert leftovers(run_dir) == []
    summary, reference = read_json(run_dir / "summary.json"), read_json(best_reference / "summary.json")
    assert summary == reference
    assert [r["val_top1"] for r in read_log(run_dir)] == [r["val_top1"] for r in read_log(best_reference)]
    best = ck.load_checkpoint(run_dir / "best.pth")
    assert best["epoch"] == summary["best_epoch"] == improved[-1]
    assert_bitwise_equal(best_reference / "best.pth", run_dir / "best.pth", keys=("model",))
    capsys.readouterr()
    assert eval_script.main(["--checkpoint", str(run_dir / "best.pth")]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["top1"] == summary["best_top1"]


# ----------------------------------------------------------------------------------------------------
# A full disk, and output folders that cannot be written.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_disk_full_during_a_save_keeps_the_last_checkpoint_and_marks_the_run_failed(tmp_path):
    config = tiny_config(tmp_path)
    result = run(train_cmd(config), AN_FAULT="enospc:write:last.pth@2")  # the end-of-epoch-2 save
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    run_dir = tmp_path / "run"
    assert "Traceback" not in out and "No space left on device" in out and str(run_dir / "last.pth") in out
    assert "free space" in out.lower() and "resume" in out
    status = read_json(run_dir / "status.json")
    assert status["state"] == "failed" and "No space left" in status["message"]
    last = ck.load_checkpoint(run_dir / "last.pth")  # the previous checkpoint, intact
    assert (last["epoch"], last["step_in_epoch"]) == (1, 0)
    assert leftovers(run_dir) == []
    run_ok(train_cmd(config))  # space freed: the same command resumes
    assert [r["epoch"] for r in read_log(run_dir)] == [1, 2]


def unwritable(tmp_path: Path, case: str) -> Path:
    """An output folder that is a file, exists but refuses writes, or cannot be created."""
    if case == "a file":
        (tmp_path / "run").write_text("not a folder")
        return tmp_path / "run"
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
        return tmp_path / "ro" if case == "read-only" else tmp_path / "ro" / "deeper" / "run"
    # root writes through permission bits; sysfs refuses even root.
    probe = Path("/sys/kernel/.an-imagenet-probe")
    try:
        probe.touch()
    except OSError:
        pass
    else:
        probe.unlink()
        pytest.skip("no folder here that refuses root's writes")
    return Path("/sys/kernel") if case == "read-only" else Path("/sys/an-imagenet-test/run")


@pytest.mark.parametrize("case", ["a file", "read-only", "not creatable"])
def test_an_unwritable_output_folder_is_a_one_paragraph_error(tmp_path, case):
    target = unwritable(tmp_path, case)
    config = tiny_config(tmp_path, train={"output_dir": str(target)})
    result = run(train_cmd(config), timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    one_paragraph_error(result.stderr)
    assert str(target) in result.stderr and "train.output_dir" in result.stderr


# ----------------------------------------------------------------------------------------------------
# One run per folder.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_is_refused_and_leaves_it_alone(tmp_path):
    config = tiny_config(tmp_path, data={"synthetic_train_size": 8000}, log={"interval": 1, "progress": "lines"})
    first = start(train_cmd(config))
    run_dir = tmp_path / "run"
    try:
        wait_for(first, run_dir / "train.log", "[2/1000]")
        stale = run_dir / ".last.pth.abcd1234.tmp"  # as if the first run were writing it now
        stale.write_bytes(b"partial")
        train_log = (run_dir / "train.log").read_text()
        second = run(train_cmd(config), timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        one_paragraph_error(second.stderr)
        err = " ".join(second.stderr.split())
        assert str(run_dir) in err and f"PID {first.pid}" in err and socket.gethostname() in err
        assert stale.exists()  # only the run holding the lock cleans up
        assert read_json(run_dir / "status.json")["state"] == "running"
        assert (run_dir / "train.log").read_text().startswith(train_log)
        assert "Resolved config" not in (run_dir / "train.log").read_text()[len(train_log) :]
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
        assert first.returncode == EXIT_PREEMPTED, out
    finally:
        if first.poll() is None:
            first.kill()


def test_stale_temporary_files_of_killed_saves_are_removed_at_start(tmp_path):
    config = tiny_config(tmp_path, sched={"epochs": 1}, data={"synthetic_train_size": 16})
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    for name in (".last.pth.x1y2z3.tmp", ".best.pth.q9w8e7.tmp", ".epoch_002.pth.a1b2c3.tmp"):
        (run_dir / name).write_bytes(b"partial checkpoint")
    (run_dir / "notes.tmp").write_text("the user's own file")
    assert train.main(["--config", str(config)]) == 0
    assert leftovers(run_dir) == [] and (run_dir / "notes.tmp").exists()


# ----------------------------------------------------------------------------------------------------
# A diverged step is never checkpointed.
# ----------------------------------------------------------------------------------------------------


class LossSpike:
    """Wraps the loss: call ``at`` returns ``factor`` x the loss, as a diverged step does (and its gradient with it)."""

    def __init__(self, inner, at: int, factor: float):
        self.inner, self.at, self.factor, self.calls = inner, at, factor, 0

    def __call__(self, logits, target):
        self.calls += 1
        loss = self.inner(logits, target)
        return loss * self.factor if self.calls == self.at else loss


def test_a_timed_save_after_a_diverged_step_is_refused(tmp_path, monkeypatch):
    """One diverged step leaves finite but exploding weights (largest weight 1.6 -> 30 -> 100) and a loss of 1e5
    that stays finite: a timed save must not keep that state as the last good checkpoint."""
    config = tiny_config(tmp_path, train={"save_minutes": 1e-9}, sched={"epochs": 3})  # a timed save at every step
    real_build_loss = engine.build.build_loss

    def spiking(cfg):
        loss_fn, mixup_fn = real_build_loss(cfg)
        return LossSpike(loss_fn, at=9, factor=1e5), mixup_fn  # batch 9: epoch 2, step 3 (of 6)

    monkeypatch.setattr(engine.build, "build_loss", spiking)
    assert train.main(["--config", str(config)]) == 1
    run_dir = tmp_path / "run"
    status = read_json(run_dir / "status.json")
    assert status["state"] == "failed" and "diverged" in status["message"], status
    assert "epoch 1, step 2" in status["message"]  # names the checkpoint on disk
    last = ck.load_checkpoint(run_dir / "last.pth")
    assert (last["epoch"], last["step_in_epoch"]) == (1, 2)  # the timed save just before the diverged step
    weights = [v for k, v in last["model"].items() if v.is_floating_point() and "running_" not in k]
    assert max(v.abs().max().item() for v in weights) < 5
    monkeypatch.undo()
    assert train.main(["--config", str(config)]) == 0  # resumes from the last good checkpoint
