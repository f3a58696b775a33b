"""Bad inputs end in one clean paragraph (exit status 2), never a traceback or a silently wrong run.

Config files (duplicate keys, empty files, non-finite numbers, cross-key checks, overrides anywhere), checkpoints
that are not checkpoints, datasets whose classes differ from the checkpoint's, synthetic data for a real-data
checkpoint, unreadable or looping dataset folders, classes without one readable image, and DALI's decode errors.
Each input is a real file written to tmp_path; the entry points run in-process under ``main_guard`` (what their
``__main__`` runs), or as subprocesses where the exit status, stderr and the absence of a traceback matter.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import eval as eval_script
import train
from engine import checkpoint as ck
from engine.config import ConfigError, load_config
from engine.errors import describe, main_guard
from tests.conftest import tiny_config
from tests.image_folders import corrupt_file, make_image_folder
from tools import check_dataset, convert_checkpoint

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("AN_DEBUG", None)


def run_script(*args: str, env: dict | None = None, preexec_fn=None, timeout: float = 300) -> tuple[int, str]:
    """Runs ``python <script> args`` from the repository root; returns (exit status, stderr)."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )
    return proc.returncode, proc.stderr


def assert_one_paragraph(err: str, *fragments: str) -> None:
    """stderr ends with one "Error: ..." paragraph (no blank line in it) holding ``fragments``, and no traceback."""
    assert "Traceback" not in err, err
    starts = [m.start() for m in re.finditer(r"^Error: ", err, flags=re.MULTILINE)]
    assert len(starts) == 1, err
    paragraph = err[starts[0] :].rstrip("\n")
    assert "\n\n" not in paragraph, err
    for fragment in fragments:
        assert fragment in paragraph, (fragment, err)


def guarded(main, argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    status = main_guard(main, argv)
    return status, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Config files.
# ----------------------------------------------------------------------------------------------------


def test_a_repeated_section_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(
        "model:\n  name: resnet50\n  norm: an\n  num_classes: 10\noptim:\n  lr: 0.1\nmodel:\n  name: resnet18\n"
    )
    with pytest.raises(ConfigError, match=r"dup.yaml, line 7: 'model' is given twice \(first on line 1\)"):
        load_config(path)
    path.write_text("model:\n  name: resnet18\n  norm: gn\n  norm_kwargs:\n    groups: 4\n    groups: 8\n")
    with pytest.raises(ConfigError, match=r"line 6: 'model.norm_kwargs.groups' is given twice \(first on line 5\)"):
        load_config(path)
    # A merge key (`<<: *anchor`) is meant to be overridden: not a duplicate.
    path.write_text("model:\n  name: resnet18\noptim:\n  <<: {lr: 0.1, momentum: 0.8}\n  lr: 0.2\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 0.2 and cfg.optim.momentum == 0.8


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_an_empty_config_file_is_refused(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"empty.yaml is empty .*every default"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "overrides", "where"),
    [
        ("optim:\n  lr: .inf\n", [], "line 4"),
        ("optim:\n  lr: .nan\n", [], "line 4"),
        ("data:\n  mean: [0.4, -.inf, 0.4]\n", [], "line 4"),
        ("", ["optim.lr=.inf"], "override 'optim.lr=.inf'"),
        ("", ["optim.lr=inf"], "override 'optim.lr=inf'"),
        ("", ["optim.lr=nan"], "override 'optim.lr=nan'"),
        ("", ["model.drop_rate=.nan"], "override 'model.drop_rate=.nan'"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_line(tmp_path, text, overrides, where):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  name: resnet18\n" + text)
    with pytest.raises(ConfigError, match="finite") as info:
        load_config(path, overrides)
    assert where in str(info.value)


def test_a_bad_value_inside_norm_or_attention_kwargs_is_a_config_error(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  name: resnet18\n  num_classes: 10\n  norm: an\n  norm_kwargs:\n    eps: tiny\n")
    with pytest.raises(ConfigError, match=r"'model.norm_kwargs.eps' in .*exp.yaml, line 6: got 'tiny', expected a"):
        load_config(path)
    cases = [
        (["model.norm=gn", "model.norm_kwargs.eps=abc"], "'model.norm_kwargs.eps'"),
        (["model.norm=bn", "model.norm_kwargs.momentum=abc"], "'model.norm_kwargs.momentum'"),
        (["model.norm=sn", "model.norm_kwargs.momentum=abc"], "'model.norm_kwargs.momentum'"),
        (["model.norm=iebn", "model.norm_kwargs.eps=x"], "'model.norm_kwargs.eps'"),
        (["model.norm=an", "model.norm_kwargs.eps=-1"], "'eps' must be a number in (0.0"),
        (["model.norm=bn", "model.norm_kwargs.momentum=5"], "'momentum' must be null"),
        (["model.attn_layer=se", "model.attn_kwargs.bias=maybe"], "'model.attn_kwargs.bias'"),
    ]
    path.write_text("model:\n  name: resnet18\n  num_classes: 10\n")
    for overrides, fragment in cases:
        with pytest.raises(ConfigError) as info:
            load_config(path, overrides)
        assert fragment in str(info.value) and "override" in str(info.value), (overrides, str(info.value))
    # Each of them used to be accepted and fail inside the first forward pass, with a traceback:
    cfg = load_config(path, ["model.norm=bn", "model.norm_kwargs.momentum=0.2"])
    assert cfg.model.options["norm_kwargs"] == {"momentum": 0.2}


def test_cross_key_checks_refuse_what_the_run_cannot_honour(tmp_path, capsys):
    config = tiny_config(tmp_path)
    cases = [
        (["sched.warmup_epochs=3", "sched.epochs=2"], "warm-up shorter than the run"),
        (["sched.warmup_epochs=2", "sched.epochs=2"], "sched.warmup_epochs"),
        (["train.amp=fp16"], "needs a CUDA device"),
        (["train.amp=fp16", "train.compile=true"], "needs a CUDA device"),
        (["train.mixup=0.2", "data.batch_size=7"], "even"),
    ]
    for overrides, fragment in cases:
        status, err = guarded(train.main, ["--config", str(config), "--dry-run", "--device", "cpu", *overrides], capsys)
        assert status == 2, (overrides, err)
        assert fragment in err and "override" in err, (overrides, err)
    assert not (tmp_path / "run").exists()
    from engine.config import check_training

    cfg = load_config(config, ["train.amp=fp16"])
    check_training(cfg, "cuda", str(config))  # fp16 is a CUDA recipe: accepted there
    cfg = load_config(config, ["train.cuda_graph=true"])
    with pytest.raises(ConfigError, match=r"train\.cuda_graph=true"):
        check_training(cfg, "cpu", str(config))


def test_overrides_are_accepted_in_any_position(tmp_path, capsys):
    config = tiny_config(tmp_path)
    argv = [
        "--config",
        str(config),
        "--resume",
        str(tmp_path / "x.pth"),
        "optim.lr=0.2",
        "--dry-run",
        "data.batch_size=16",
    ]
    status, err = guarded(train.main, argv, capsys)
    assert status == 0, err
    status, _ = guarded(
        train.main, ["optim.lr=0.2", "--config", str(config), "data.batch_size=16", "--dry-run"], capsys
    )
    assert status == 0


# ----------------------------------------------------------------------------------------------------
# Checkpoints and eval.py.
# ----------------------------------------------------------------------------------------------------


def folder_config(tmp_path: Path, root: Path, data: dict | None = None, **train) -> Path:
    """A one-epoch run of the tiny model on the 3-class folder dataset ``root``; ``data`` adds data settings."""
    return tiny_config(
        tmp_path,
        model={"num_classes": 3},
        data={"backend": "torch", "root": str(root), "batch_size": 4, "img_size": 32, **(data or {})},
        sched={"epochs": 1, "warmup_epochs": 0},
        train=train,
        log={"tensorboard": False},
    )


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A tiny model trained for one step on a 3-class JPEG folder dataset (cat, dog, owl)."""
    tmp = tmp_path_factory.mktemp("folder_run")
    root = make_image_folder(tmp / "ds", train_per_class=2, val_per_class=2, size=(40, 32))
    config = folder_config(tmp, root, steps_per_epoch=1)
    assert main_guard(train.main, ["--config", str(config)]) == 0
    return tmp / "run" / "last.pth", root


def dataset(path: Path, classes: tuple[str, ...]) -> Path:
    return make_image_folder(path, classes=classes, train_per_class=1, val_per_class=2, size=(40, 32))


def test_the_checkpoint_holds_the_class_names(folder_run):
    ckpt, _ = folder_run
    assert ck.load_checkpoint(ckpt)["classes"] == ["cat", "dog", "owl"]


def test_eval_refuses_a_dataset_with_other_classes(folder_run, tmp_path, capsys):
    ckpt, root = folder_run
    status, _ = guarded(eval_script.main, ["--checkpoint", str(ckpt), "--data-root", str(root)], capsys)
    assert status == 0  # the training dataset itself
    for name, classes, fragment in [
        ("more", ("cat", "dog", "owl", "yak"), "Only in the dataset: yak"),  # used to crash: Target 3 out of bounds
        ("fewer", ("cat", "dog"), "only in the checkpoint: owl"),  # used to report a number silently
        ("renamed", ("cat", "dog", "yak"), "Only in the dataset: yak; only in the checkpoint: owl"),
    ]:
        other = dataset(tmp_path / name, classes)
        status, err = guarded(eval_script.main, ["--checkpoint", str(ckpt), "--data-root", str(other)], capsys)
        assert status == 2, (name, err)
        assert_one_paragraph(err, "does not hold the classes", str(ckpt), fragment)


def test_eval_checks_the_class_count_of_a_checkpoint_without_names(folder_run, tmp_path, capsys):
    ckpt, _ = folder_run
    state = ck.load_checkpoint(ckpt)
    del state["classes"]  # an older checkpoint, or one converted from the official release
    old = tmp_path / "old.pth"
    torch.save(state, old)
    other = dataset(tmp_path / "more", ("a", "b", "c", "d"))
    status, err = guarded(eval_script.main, ["--checkpoint", str(old), "--data-root", str(other)], capsys)
    assert status == 2
    assert_one_paragraph(err, "has 4 classes but the model", "has 3 outputs")
    same_count = dataset(tmp_path / "same", ("a", "b", "c"))
    status, err = guarded(eval_script.main, ["--checkpoint", str(old), "--data-root", str(same_count)], capsys)
    assert status == 0, err  # no names to compare: the count fits


def test_eval_refuses_synthetic_images_for_a_real_data_checkpoint(folder_run, tmp_path, capsys):
    ckpt, root = folder_run
    status, err = guarded(eval_script.main, ["--checkpoint", str(ckpt), "--backend", "synthetic"], capsys)
    assert status == 2
    assert_one_paragraph(err, "trained on data.backend=torch", "random images", "--allow-synthetic")
    argv = ["--checkpoint", str(ckpt), "--backend", "synthetic", "--allow-synthetic", "data.synthetic_val_size=4"]
    status, err = guarded(eval_script.main, argv, capsys)
    assert status == 0, err
    # A checkpoint trained on synthetic data, evaluated with --data-root: the stored backend reads no folder.
    state = ck.load_checkpoint(ckpt)
    state["config"]["data"]["backend"] = "synthetic"
    state["classes"] = None
    synthetic = tmp_path / "synthetic.pth"
    torch.save(state, synthetic)
    status, err = guarded(eval_script.main, ["--checkpoint", str(synthetic), "--data-root", str(root)], capsys)
    assert status == 2
    assert_one_paragraph(err, "data.backend is 'synthetic'", "--backend torch")
    argv = ["--checkpoint", str(synthetic), "--data-root", str(root), "--backend", "torch"]
    assert guarded(eval_script.main, argv, capsys)[0] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_a_clean_error(folder_run, tmp_path, capsys):
    ckpt, _ = folder_run
    for main, argv in [
        (eval_script.main, ["--checkpoint", str(ckpt), "--device", "cuda"]),
        (train.main, ["--config", str(tiny_config(tmp_path)), "--device", "cuda"]),
    ]:
        status, err = guarded(main, argv, capsys)
        assert status == 2
        assert_one_paragraph(err, "--device cuda was given but no CUDA device is visible", "--device cpu")


def test_tools_name_a_missing_input(tmp_path, capsys):
    from tools import bench_loader, make_table, model_stats, plot_run

    missing = tmp_path / "missing"
    cases = [
        (convert_checkpoint.main, ["--from", "aognet-v2", str(missing), str(tmp_path / "out.pth")], "does not exist"),
        (bench_loader.main, ["--data-root", str(missing), "--backend", "torch"], "does not exist"),
        (make_table.main, [str(missing)], "does not exist"),
        (plot_run.main, [str(missing)], "does not exist"),
        (model_stats.main, ["--models", "resnet05"], "No model/norm matches"),
    ]
    for main, argv, fragment in cases:
        status, err = guarded(main, argv, capsys)
        assert status == 2, (argv, err)
        assert_one_paragraph(err, fragment)


def test_eval_overrides_in_any_position(folder_run, capsys):
    ckpt, root = folder_run
    argv = [
        "--checkpoint",
        str(ckpt),
        "data.crop_pct=0.9",
        "--data-root",
        str(root),
        "data.workers=0",
        "--device",
        "cpu",
    ]
    status, err = guarded(eval_script.main, argv, capsys)
    assert status == 0, err


def test_files_that_are_not_checkpoints_are_named_as_such(tmp_path):
    noise = tmp_path / "noise.pth"
    noise.write_bytes(bytes(range(256)) * 20)
    text = tmp_path / "notes.pth"
    text.write_text("model:\n  name: resnet50\n")
    release = tmp_path / "release.zip"
    import zipfile

    with zipfile.ZipFile(release, "w") as z:
        z.writestr("resnet50_an/config.yaml", "arch: resnet\n")
        z.writestr("resnet50_an/model_best.pth.tar", b"...")
    pickled = tmp_path / "objects.pth"
    torch.save({"model": {}, "args": argparse.Namespace(lr=0.1)}, pickled)
    for path, fragment in [
        (noise, "neither a zip archive nor a pickle stream"),
        (text, "a text file (it starts with 'model: name: resnet50')"),
        (release, "a zip archive holding resnet50_an/config.yaml"),
    ]:
        with pytest.raises(ck.CheckpointError) as info:
            ck.load_checkpoint(path)
        message = str(info.value)
        assert fragment in message and "not a PyTorch checkpoint" in message, message
        assert "pickled" not in message and "weights_only=False" not in message, message
    with pytest.raises(ck.CheckpointError, match=r"holds a pickled Python object \(argparse.Namespace\)"):
        ck.load_checkpoint(pickled)


@pytest.mark.slow
def test_eval_and_convert_of_a_random_file_exit_2_without_a_traceback(tmp_path, capsys):
    noise = tmp_path / "noise.pth"
    noise.write_bytes(bytes(range(7, 256)) * 16)
    status, err = run_script("eval.py", "--checkpoint", str(noise))
    assert status == 2
    assert_one_paragraph(err, str(noise), "not a PyTorch checkpoint")
    assert "weights_only" not in err
    argv = ["--from", "aognet-v2", str(noise), str(tmp_path / "out.pth"), "--model", "resnet50", "--norm", "an"]
    argv.append("--trust-pickle")  # even so, nothing is unpickled
    status, err = guarded(convert_checkpoint.main, argv, capsys)
    assert status == 2
    assert_one_paragraph(err, "not a PyTorch checkpoint")
    assert "--trust-pickle" not in err and not (tmp_path / "out.pth").exists()


@pytest.mark.slow
def test_the_debug_switch_shows_the_traceback(tmp_path):
    config = tmp_path / "empty.yaml"
    config.write_text("")
    status, err = run_script("train.py", "--config", str(config), "--dry-run")
    assert status == 2
    assert_one_paragraph(err, "is empty")
    status, err = run_script("train.py", "--config", str(config), "--dry-run", env={**ENV, "AN_DEBUG": "1"})
    assert status == 2 and "Traceback" in err and "ConfigError" in err and "Error: Config file" in err


# ----------------------------------------------------------------------------------------------------
# Datasets.
# ----------------------------------------------------------------------------------------------------


def test_a_symlink_loop_in_the_dataset_is_a_clean_error(tmp_path, capsys):
    root = make_image_folder(tmp_path / "ds", train_per_class=2, val_per_class=1)
    (root / "train" / "loop").symlink_to("loop")  # a link to itself, where a class folder would be
    status, err = guarded(train.main, ["--config", str(folder_config(tmp_path, root))], capsys)
    assert status == 2
    assert_one_paragraph(err, str(root / "train" / "loop"), "symbolic link that loops")
    assert check_dataset.main([str(root)]) == 1
    assert "symbolic link that loops" in capsys.readouterr().out
    (root / "train" / "loop").unlink()
    (root / "train" / "cat" / "cat_9.JPEG").symlink_to("cat_9.JPEG")  # an image that is a link to itself
    status, err = guarded(train.main, ["--config", str(folder_config(tmp_path, root))], capsys)
    assert status == 2
    assert_one_paragraph(err, "cat_9.JPEG", "symbolic link that loops")
    assert check_dataset.main([str(root)]) == 1
    assert "cat_9.JPEG is a symbolic link that loops" in capsys.readouterr().out


_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def _drop_file_capabilities() -> None:
    """preexec_fn: as root, drop the capabilities that let root read any file, so permissions apply to the child."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def unprivileged() -> dict:
    """Subprocess arguments under which a folder without read permission is unreadable, also for root."""
    if os.geteuid() != 0:
        return {}
    probe = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_drop_file_capabilities, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE (prctl refused): permissions do not apply")
    return {"preexec_fn": _drop_file_capabilities}


@pytest.mark.slow
def test_a_class_folder_without_read_permission_is_a_clean_error(tmp_path):
    extra = unprivileged()
    root = make_image_folder(tmp_path / "ds", train_per_class=2, val_per_class=1)
    locked = root / "train" / "dog"
    locked.chmod(0)
    try:
        config = folder_config(tmp_path, root)
        status, err = run_script("train.py", "--config", str(config), **extra)
        assert status == 2, err
        assert_one_paragraph(err, str(locked), "permission denied", "chmod")
        proc = subprocess.run(
            [sys.executable, "tools/check_dataset.py", str(root)],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            **extra,
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"{locked} cannot be read: permission denied" in proc.stdout
    finally:
        locked.chmod(0o755)


def test_a_class_without_one_readable_image_stops_training(tmp_path, capsys):
    root = make_image_folder(tmp_path / "ds", train_per_class=3, val_per_class=1)
    for path in (root / "train" / "owl").iterdir():
        corrupt_file(path)
    corrupt_file(root / "train" / "cat" / "cat_0.JPEG")  # one bad file in a class is skipped, as before
    status, err = guarded(train.main, ["--config", str(folder_config(tmp_path, root))], capsys)
    assert status == 2
    assert_one_paragraph(err, f"Every image of the class folder {root / 'train' / 'owl'} (3 files) is unreadable")
    assert "check_dataset.py" in err
    assert check_dataset.main([str(root)]) == 1
    out = capsys.readouterr().out
    assert "none of whose images can be decoded" in out and str(root / "train" / "owl") in out


def test_a_validation_class_without_one_readable_image_stops_evaluation(tmp_path):
    from tests.conftest import data_config

    root = make_image_folder(tmp_path / "ds", train_per_class=2, val_per_class=2)
    for path in (root / "val" / "dog").iterdir():
        corrupt_file(path, "truncate")
    pattern = r"class folder .*val/dog \(2 files\).*leave the whole class"
    with (
        data.build_loaders(data_config(root, batch_size=2), build_train=False) as loaders,
        pytest.raises(data.DataLoadError, match=pattern),
    ):
        list(loaders.val)


def test_a_loader_worker_error_is_shown_without_the_worker_traceback():
    """DataLoader workers re-raise their exception with the worker's traceback inside the message."""
    from torch._utils import ExceptionWrapper

    try:
        raise data.DataLoadError("64 consecutive training files from /x/a.JPEG on are unreadable.")
    except data.DataLoadError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(data.DataLoadError) as info:
        wrapped.reraise()
    assert "Traceback" in str(info.value)
    assert describe(info.value) == "64 consecutive training files from /x/a.JPEG on are unreadable."


@pytest.mark.slow
def test_dali_decode_error_in_training_is_one_paragraph(tmp_path):
    pytest.importorskip("nvidia.dali")
    root = make_image_folder(tmp_path / "ds", train_per_class=4, val_per_class=1, size=(64, 48))
    bad = corrupt_file(root / "train" / "dog" / "dog_1.JPEG", "truncate")
    config = folder_config(tmp_path, root, data={"backend": "dali_cpu", "workers": 1})
    status, err = run_script("train.py", "--config", str(config), "--device", "cpu")
    assert status == 2, err
    assert_one_paragraph(err, "dog_1.JPEG")
    assert bad.exists()
