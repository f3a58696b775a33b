"""The resume policy: what may change when a run is resumed, what is refused, and how (README "Resuming")."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

import data
import train
from engine import checkpoint as ck
from engine.distributed import EXIT_PREEMPTED
from tests.conftest import tiny_config
from tests.image_folders import make_image_folder
from tests.processes import read_log
from tests.test_train import SignalAfter, assert_same_state, wrap_train_loader

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = {"data": {"synthetic_train_size": 16}, "sched": {"epochs": 2}}  # 2 steps per epoch, 4 updates


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A run folder of a finished 2-epoch run (copied by each test)."""
    tmp = tmp_path_factory.mktemp("finished")
    assert train.main(["--config", str(tiny_config(tmp, **SMALL))]) == 0
    return tmp / "run"


@pytest.fixture
def run_copy(finished, tmp_path) -> tuple[Path, Path]:
    """(config, run folder): a copy of the finished run, and a config that points at it."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return tiny_config(tmp_path, **SMALL), run_dir


def train_log(run_dir: Path) -> str:
    return (run_dir / "train.log").read_text()


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=0.1",
        "data.batch_size=4",
        "train.seed=1",
        "optim.accum_steps=2",
        "train.amp=bf16",
        "model.drop_rate=0.1",
        "model.norm_kwargs.attention=softmax",
        "optim.name=adamw",
        "sched.warmup_epochs=0",
        "train.label_smoothing=0.1",
    ],
)
def test_a_changed_experiment_is_refused_with_the_way_to_a_new_run(run_copy, override):
    config, run_dir = run_copy
    before = (run_dir / "last.pth").read_bytes()
    key = ".".join(override.split("=")[0].split(".")[:2])
    with pytest.raises(
        ck.CheckpointError, match=rf"Cannot resume.*{key} .* -> .*another train.output_dir.*--allow-changes"
    ):
        train.main(["--config", str(config), override, "sched.epochs=3"])
    assert (run_dir / "last.pth").read_bytes() == before


def test_allow_changes_resumes_and_logs_the_changes(run_copy):
    config, run_dir = run_copy
    assert train.main(["--config", str(config), "optim.lr=0.1", "sched.epochs=3", "--allow-changes"]) == 0
    text = train_log(run_dir)
    assert "allowed by --allow-changes: optim.lr 0.05 -> 0.1" in text
    assert [record["epoch"] for record in read_log(run_dir)] == [1, 2, 3]


def test_more_epochs_continue_on_the_schedule_recomputed_from_the_step(run_copy):
    config, run_dir = run_copy
    with pytest.raises(ck.CheckpointError, match=r"has done 2 epochs but sched.epochs is now 1"):
        train.main(["--config", str(config), "sched.epochs=1"])
    assert train.main(["--config", str(config), "sched.epochs=4"]) == 0
    text = train_log(run_dir)
    assert "sched.epochs changed from 2 to 4" in text and "sched.epochs 2 -> 4: the LR for update 4" in text
    log = read_log(run_dir)
    peak, warmup, total = 0.05 * 8 / 256, 1, 8  # 2 updates per epoch, 0.5 warm-up epochs, 4 epochs
    for record in log[2:]:  # the last update of epoch e is update 2e - 1 (0-based), evaluated at its end: 2e
        t = 2 * record["epoch"]
        assert record["lr"] == pytest.approx(peak * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) / 2)


def test_switching_the_optimizer_needs_allow_changes_and_then_starts_it_fresh(run_copy):
    config, run_dir = run_copy
    with pytest.raises(ck.CheckpointError, match=r"optim.name 'sgd' -> 'adamw'"):
        train.main(["--config", str(config), "optim.name=adamw", "sched.epochs=3"])
    assert train.main(["--config", str(config), "optim.name=adamw", "sched.epochs=3", "--allow-changes"]) == 0
    assert "optimizer sgd -> adamw): adamw starts from a fresh state" in train_log(run_dir)
    assert ck.load_checkpoint(run_dir / "last.pth")["optimizer"]["state"][0]["step"] == 2  # adamw's own count


def test_a_checkpoint_without_optimizer_state_is_a_clear_error(run_copy, tmp_path):
    config, run_dir = run_copy
    saved = ck.load_checkpoint(run_dir / "last.pth")
    del saved["optimizer"]
    ck.save_atomic(saved, tmp_path / "no_optimizer.pth")
    args = ["--config", str(config), "--resume", str(tmp_path / "no_optimizer.pth"), "sched.epochs=3"]
    with pytest.raises(ck.CheckpointError, match=r"no_optimizer.pth: it holds model weights but no optimizer.*--allow"):
        train.main(args)
    assert train.main([*args, "--allow-changes"]) == 0
    assert "(none saved): sgd starts from a fresh state" in train_log(run_dir)

    weights = {"model": saved["model"], "config": saved["config"]}  # an exported or converted file
    ck.save_atomic(weights, tmp_path / "weights.pth")
    with pytest.raises(ck.CheckpointError, match=r"weights.pth: it holds model weights but no optimizer, epoch"):
        train.main(["--config", str(config), "--resume", str(tmp_path / "weights.pth"), "--allow-changes"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folders")
    make_image_folder(root / "a", train_per_class=8, val_per_class=2, size=(24, 20))
    shutil.copytree(root / "a", root / "b")  # the same data, moved
    make_image_folder(root / "c", train_per_class=12, val_per_class=2, size=(24, 20))  # another training set
    return root


def folder_config(tmp_path: Path, root: Path) -> Path:
    return tiny_config(
        tmp_path,
        model={"name": "resnet18", "norm": "bn", "num_classes": 3},
        data={"backend": "torch", "root": str(root), "batch_size": 4, "img_size": 16},
        sched={"epochs": 2},
    )


@pytest.mark.slow
def test_moved_data_is_a_notice_and_resumes_at_the_same_step_but_other_data_is_refused(tmp_path, folders, monkeypatch):
    straight = folder_config(tmp_path / "straight", folders / "a")
    assert train.main(["--config", str(straight)]) == 0

    config = folder_config(tmp_path, folders / "a")
    # stop mid-epoch 1 (6 steps)
    real_build = wrap_train_loader(monkeypatch, lambda loader: SignalAfter(loader, epoch=0, at=2))
    assert train.main(["--config", str(config)]) == EXIT_PREEMPTED
    monkeypatch.setattr(data, "build_loaders", real_build)
    with pytest.raises(ck.CheckpointError, match=r"an epoch now has 9 steps but had 6"):
        train.main(["--config", str(config), f"data.root={folders / 'c'}"])
    assert train.main(["--config", str(config), f"data.root={folders / 'b'}"]) == 0
    text = train_log(tmp_path / "run")
    assert f"data.root changed from '{folders / 'a'}' to '{folders / 'b'}'" in text
    assert "Resumed from" in text and "epoch 0, step 4" in text  # the rest of the epoch is not skipped
    a = ck.load_checkpoint(tmp_path / "straight" / "run" / "last.pth")
    b = ck.load_checkpoint(tmp_path / "run" / "last.pth")
    for key in ("model", "optimizer"):
        assert_same_state(a[key], b[key], key)
    assert torch.equal(torch.tensor(a["global_update"]), torch.tensor(b["global_update"]))
