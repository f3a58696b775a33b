"""train.py and eval.py end to end on tiny models and synthetic data (CPU, one process)."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

import data
import eval as eval_script
import train
from engine import checkpoint as ck
from engine.distributed import EXIT_PREEMPTED
from engine.errors import main_guard
from tests.conftest import tiny_config
from tests.processes import REPO, read_log, run_ok, start, torchrun, train_cmd, wait_for

CUDA = torch.cuda.is_available()


def assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{what}: {k} differs"
        elif isinstance(a[k], dict):
            assert_same_state(a[k], b[k], f"{what}.{k}")
        elif isinstance(a[k], list):
            assert len(a[k]) == len(b[k]), f"{what}.{k}"
            for i, (x, y) in enumerate(zip(a[k], b[k])):
                if isinstance(x, dict):
                    assert_same_state(x, y, f"{what}.{k}[{i}]")
                else:
                    assert x == y, f"{what}.{k}[{i}]"
        else:
            assert a[k] == b[k], f"{what}: {k} differs ({a[k]} vs {b[k]})"


def test_train_then_eval_reproduces_the_validation_number(tmp_path, capsys):
    config = tiny_config(tmp_path, train={"ema": True, "ema_decay": 0.9})
    assert train.main(["--config", str(config)]) == 0
    run = tmp_path / "run"
    log = read_log(run)
    assert [r["epoch"] for r in log] == [1, 2]
    for r in log:
        assert r["val_count"] == 21 and r["ema_count"] == 21
        for key in ("train_loss", "lr", "val_top1", "val_top5", "best_top1", "images_per_sec", "data_time"):
            assert r[key] is not None and r[key] == r[key], key
        assert "compute_images_per_sec" in r and "peak_memory_mb" in r
    peak = 0.05 * 8 / 256
    assert log[0]["lr"] == pytest.approx(
        peak * (1 + math.cos(math.pi * 3 / 9)) / 2
    )  # epoch 1 ends with update 5 (0-based) of 12, 3 of them warm-up: 3 of 9 cosine steps done after it
    assert log[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the last update ends the cosine at 0
    for name in ("last.pth", "best.pth", "config.yaml", "summary.json", "status.json", "train.log"):
        assert (run / name).exists(), name
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_top1"] == max(r["val_top1"] for r in log) and summary["last_top1"] == log[-1]["val_top1"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"histograms": 0})
    events.Reload()
    histograms = events.Tags()["histograms"]
    assert len(histograms) == 16 and "an_attention/layer1.0.bn2" in histograms  # one per AN layer of ResNet-50
    assert len(events.Histograms("an_attention/layer4.2.bn2")) == 2  # every epoch
    assert {"train/loss", "train/lr", "epoch/val_top1", "epoch/best_top1"} <= set(events.Tags()["scalars"])

    best = ck.load_checkpoint(run / "best.pth")
    assert best["config"]["model"]["norm"] == "an" and best["git_rev"] and best["epoch"] == summary["best_epoch"]
    torch.load(run / "best.pth", weights_only=True)
    capsys.readouterr()
    assert eval_script.main(["--checkpoint", str(run / "best.pth")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["count"] == 21 and result["model"] == "resnet50" and result["norm"] == "an"
    assert result["top1"] == summary["best_top1"]  # the same number the trainer logged for that epoch
    assert json.loads((run / "best.eval.json").read_text()) == result
    assert eval_script.main(["--checkpoint", str(run / "last.pth"), "--ema"]) == 0
    ema_result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ema_result["top1"] == log[-1]["ema_top1"] and (run / "last.ema.eval.json").exists()


class LoaderWrapper:
    """Wraps a train loader: a subclass overrides ``epoch``; every other attribute is the wrapped loader's."""

    def __getattr__(self, name):
        return getattr(self.inner, name)


def wrap_train_loader(monkeypatch, wrap):
    """Makes ``data.build_loaders`` wrap the training loader it builds in ``wrap(loader)``; returns the real
    ``data.build_loaders`` (to put back with ``monkeypatch.setattr``)."""
    real_build = data.build_loaders

    def build_wrapped(*args, **kwargs):
        loaders = real_build(*args, **kwargs)
        loaders.train = wrap(loaders.train)
        return loaders

    monkeypatch.setattr(data, "build_loaders", build_wrapped)
    return real_build


class SignalAfter(LoaderWrapper):
    """Wraps a train loader; sends ``signum`` to this process after yielding batch ``at`` of epoch ``epoch``."""

    def __init__(self, inner, epoch: int, at: int, signum: int = signal.SIGTERM):
        self.inner, self.signal_epoch, self.at, self.signum = inner, epoch, at, signum

    def epoch(self, epoch: int, start_step: int = 0):
        for i, batch in enumerate(self.inner.epoch(epoch, start_step=start_step), start=start_step):
            yield batch
            if epoch == self.signal_epoch and i == self.at:
                os.kill(os.getpid(), self.signum)


def test_stop_mid_epoch_and_resume_is_bitwise_equal(tmp_path, monkeypatch):
    sections = {"train": {"ema": True, "ema_decay": 0.9}}
    straight = tiny_config(tmp_path / "a", **sections)
    assert train.main(["--config", str(straight)]) == 0

    stopped = tiny_config(tmp_path / "b", **sections)
    # SIGTERM arrives while batch 4 of epoch 2 is fetched: the run stops after step 4, mid-epoch.
    real_build = wrap_train_loader(monkeypatch, lambda loader: SignalAfter(loader, epoch=1, at=2))
    assert train.main(["--config", str(stopped)]) == EXIT_PREEMPTED
    run_b = tmp_path / "b" / "run"
    status = json.loads((run_b / "status.json").read_text())
    assert status["state"] == "preempted" and status["epoch"] == 1 and status["step"] == 4
    mid = ck.load_checkpoint(run_b / "last.pth")
    assert (mid["epoch"], mid["step_in_epoch"]) == (1, 4)
    monkeypatch.setattr(data, "build_loaders", real_build)
    assert train.main(["--config", str(stopped)]) == 0  # auto-resume from last.pth

    a = ck.load_checkpoint(tmp_path / "a" / "run" / "last.pth")
    b = ck.load_checkpoint(run_b / "last.pth")
    for key in ("model", "ema", "optimizer"):
        assert_same_state(a[key], b[key], key)
    assert (a["epoch"], a["global_update"], a["best_top1"]) == (b["epoch"], b["global_update"], b["best_top1"])
    log_a, log_b = read_log(tmp_path / "a" / "run"), read_log(run_b)
    for ra, rb in zip(log_a, log_b, strict=True):
        for key in ("train_loss", "val_top1", "val_top5", "val_loss", "ema_top1", "lr"):
            assert ra[key] == rb[key], key


def test_finished_run_is_not_retrained_and_earlier_runs_are_not_overwritten(tmp_path):
    config = tiny_config(tmp_path, sched={"epochs": 1})
    assert train.main(["--config", str(config)]) == 0
    run = tmp_path / "run"
    before = (run / "last.pth").read_bytes()
    assert train.main(["--config", str(config)]) == 0  # resumes at the end: nothing left to do
    assert (run / "last.pth").read_bytes() == before and len(read_log(run)) == 1
    with pytest.raises(SystemExit, match=r"refusing to overwrite an earlier run"):
        train.main(["--config", str(config), "train.auto_resume=false"])
    assert (run / "last.pth").read_bytes() == before
    other = tiny_config(tmp_path, name="other.yaml", model={"norm": "bn"})
    with pytest.raises(ck.CheckpointError, match=r"model.norm 'an' -> 'bn'.*another train.output_dir"):
        train.main(["--config", str(other)])


class NaNAfter(LoaderWrapper):
    def __init__(self, inner, at: int):
        self.inner, self.at = inner, at

    def epoch(self, epoch: int, start_step: int = 0):
        for i, (x, y) in enumerate(self.inner.epoch(epoch, start_step=start_step), start=start_step):
            if epoch == 1 and i >= self.at:
                x = torch.full_like(x, float("nan"))
            yield x, y


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, caplog):
    config = tiny_config(tmp_path, sched={"epochs": 3})
    wrap_train_loader(monkeypatch, lambda loader: NaNAfter(loader, at=1))
    assert train.main(["--config", str(config)]) == 1
    run = tmp_path / "run"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "non-finite" in status["message"] and "last good one" in status["message"]
    last = ck.load_checkpoint(run / "last.pth")
    assert last["epoch"] == 1 and last["step_in_epoch"] == 0  # the end-of-epoch-1 checkpoint, untouched
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_eval_errors_name_the_file(tmp_path, capsys):
    config = tiny_config(tmp_path, sched={"epochs": 1})
    assert train.main(["--config", str(config)]) == 0
    run = tmp_path / "run"
    with pytest.raises(ck.CheckpointError, match=r"missing.pth does not exist.*Checkpoints in"):
        eval_script.main(["--checkpoint", str(run / "missing.pth")])
    blob = (run / "last.pth").read_bytes()
    (run / "cut.pth").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(ck.CheckpointError, match=r"cut.pth is truncated or corrupt"):
        eval_script.main(["--checkpoint", str(run / "cut.pth")])
    other = tiny_config(tmp_path, name="other.yaml", model={"name": "resnet18", "norm": "bn"})
    with pytest.raises(ck.CheckpointError, match=r"do not fit this model"):
        eval_script.main(["--checkpoint", str(run / "last.pth"), "--config", str(other)])
    with pytest.raises(ck.CheckpointError, match=r"has no EMA weights"):
        eval_script.main(["--checkpoint", str(run / "last.pth"), "--ema"])


def test_dry_run_prints_the_plan_without_data(tmp_path, capsys):
    config = tiny_config(tmp_path, data={"backend": "torch", "root": str(tmp_path / "no-data-here")})
    assert train.main(["--config", str(config), "--dry-run", "data.batch_size=16"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "MACs" in out and "peak LR        0.003125 = 0.05 x 16 / 256" in out
    assert "steps" in out and not (tmp_path / "run").exists()


def test_config_errors_exit_with_a_message(tmp_path, capsys):
    config = tiny_config(tmp_path)
    assert main_guard(train.main, ["--config", str(config), "optim.lrr=0.1"]) == 2
    assert "Did you mean 'lr'" in capsys.readouterr().err
    assert main_guard(train.main, ["--config", str(config), "model.name=resnet05"]) == 2
    assert "Did you mean 'resnet50'" in capsys.readouterr().err
    assert main_guard(train.main, ["--config", str(config), "train.mixup=0.2", "data.batch_size=7"]) == 2
    assert "even" in capsys.readouterr().err


def test_mixup_cutmix_smoothing_accumulation_and_clipping_run(tmp_path):
    config = tiny_config(
        tmp_path,
        train={"mixup": 0.2, "cutmix": 1.0, "label_smoothing": 0.1},
        optim={"accum_steps": 2, "clip_grad": 1.0, "nesterov": True, "decay_norm": False},
        sched={"epochs": 1},
    )
    assert train.main(["--config", str(config)]) == 0
    last = ck.load_checkpoint(tmp_path / "run" / "last.pth")
    assert last["global_update"] == 3  # 6 micro-batches per epoch / 2 accumulation steps
    groups = last["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.0, 1e-4} and all(g["nesterov"] for g in groups)


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    """Without BN (GroupNorm), 2 x 8 accumulated equals one batch of 16 (up to float reordering)."""
    common = {"model": {"norm": "gn", "norm_kwargs": {"groups": 4}}, "sched": {"epochs": 1, "warmup_epochs": 0}}
    big = tiny_config(tmp_path / "big", data={"batch_size": 16}, **common)
    acc = tiny_config(tmp_path / "acc", optim={"accum_steps": 2}, **common)
    assert train.main(["--config", str(big)]) == 0
    assert train.main(["--config", str(acc)]) == 0
    a = ck.load_checkpoint(tmp_path / "big" / "run" / "last.pth")["model"]
    b = ck.load_checkpoint(tmp_path / "acc" / "run" / "last.pth")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_an_epoch_ends_on_an_optimizer_step(tmp_path):
    """56 images in batches of 8 with 2 accumulation steps: 6 batches an epoch, not 7, and no gradient of a
    7th batch carried into the next epoch, so 2 epochs equal the batch-16 run (which drops the same 8 images)."""
    common = {
        "model": {"norm": "gn", "norm_kwargs": {"groups": 4}},
        "sched": {"epochs": 2, "warmup_epochs": 0},
        "data": {"synthetic_train_size": 56},
    }
    big = tiny_config(tmp_path / "big", **{**common, "data": {"synthetic_train_size": 56, "batch_size": 16}})
    acc = tiny_config(tmp_path / "acc", optim={"accum_steps": 2}, **common)
    assert train.main(["--config", str(big)]) == 0
    assert train.main(["--config", str(acc)]) == 0
    a = ck.load_checkpoint(tmp_path / "big" / "run" / "last.pth")
    b = ck.load_checkpoint(tmp_path / "acc" / "run" / "last.pth")
    assert a["global_update"] == b["global_update"] == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_sigterm_to_a_real_process_checkpoints_and_exits_75(tmp_path):
    config = tiny_config(tmp_path, data={"synthetic_train_size": 800}, log={"interval": 1, "progress": "lines"})
    cmd = train_cmd(config)
    proc = start(cmd, new_session=False)
    wait_for(proc, tmp_path / "run" / "train.log", "[3/100]", timeout=120)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out
    state = ck.load_checkpoint(tmp_path / "run" / "last.pth")
    assert state["epoch"] == 0 and 3 <= state["step_in_epoch"] < 100
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "preempted"
    out = run_ok(cmd, timeout=300)
    assert f"Resumed from {tmp_path / 'run' / 'last.pth'}: epoch 0, step {state['step_in_epoch']}" in out


@pytest.mark.parametrize(
    "amp", ["bf16", pytest.param("fp16", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")])]
)
def test_amp_runs_and_saves_its_scaler(tmp_path, amp):
    config = tiny_config(
        tmp_path, train={"amp": amp, "channels_last": True}, sched={"epochs": 1}, data={"synthetic_train_size": 16}
    )
    assert train.main(["--config", str(config)]) == 0
    last = ck.load_checkpoint(tmp_path / "run" / "last.pth")
    assert (last["scaler"] is not None) == (amp == "fp16")  # fp16 needs a grad scaler, bf16 does not
    assert all(v.dtype != torch.float16 for v in last["model"].values())  # weights stay in full precision
    assert read_log(tmp_path / "run")[0]["val_count"] == 21


def test_corrupt_images_are_skipped_counted_and_the_run_goes_on(tmp_path, capsys):
    from tests.image_folders import corrupt_file, make_image_folder

    root = make_image_folder(tmp_path / "ds", train_per_class=6, val_per_class=5, size=(72, 64))
    corrupt_file(root / "train" / "dog" / "dog_2.JPEG")
    corrupt_file(root / "val" / "owl" / "owl_1.JPEG", mode="truncate")
    config = tiny_config(
        tmp_path,
        model={"num_classes": 3},
        data={"backend": "torch", "root": str(root), "batch_size": 4, "workers": 1},
        sched={"epochs": 1},
    )
    assert train.main(["--config", str(config)]) == 0
    record = read_log(tmp_path / "run")[0]
    assert record["val_count"] == 14 and record["val_skipped"] == 1  # 15 images, one unreadable
    text = (tmp_path / "run" / "train.log").read_text()
    assert "owl_1.JPEG" in text and "dog_2.JPEG" in text and "check_dataset" in text
    capsys.readouterr()
    assert eval_script.main(["--checkpoint", str(tmp_path / "run" / "last.pth")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["count"] == 14 and result["top1"] == record["val_top1"]


@pytest.mark.slow
def test_demo_script_end_to_end_on_a_reduced_budget(tmp_path):
    """The README's main command (minus pip): builds the digits, trains, evaluates, compares the numbers."""
    overrides = [f"train.output_dir={tmp_path / 'run'}", "sched.epochs=1", "sched.warmup_epochs=0.5"]
    overrides.append("train.steps_per_epoch=4")
    demo = ["bash", str(REPO / "scripts" / "demo.sh"), *overrides]
    out = run_ok(demo, timeout=600, cwd=tmp_path, DIGITS_ROOT=str(tmp_path / "digits"), OMP_NUM_THREADS="2")
    assert (tmp_path / "digits" / "train" / "7").is_dir() and (tmp_path / "digits" / "val" / "0").is_dir()
    assert "eval.py top-1" in out and ": same" in out
    record = read_log(tmp_path / "run")[0]
    assert record["val_count"] == 359  # every digit of the validation split, exactly once


def test_torchrun_dry_run_of_the_paper_config_exactly_as_written(tmp_path):
    cmd = torchrun("--standalone", "--nproc_per_node", "1", "train.py", "--config", "resnet50_an.yaml", "--dry-run")
    out = run_ok(cmd, timeout=300, IMAGENET_ROOT=str(tmp_path / "nothing"))
    assert "parameters     25,755," in out and "MACs           4.089G" in out
    assert "global batch   128 = 128 per GPU x 1 processes x 1" in out and "peak LR        0.05 =" in out
    assert "train images   1,281,167 (assumed: ImageNet-1k" in out and "10009 per epoch" in out


def test_compiled_training_saves_plain_weights(tmp_path, monkeypatch, capsys):
    """train.compile wiring (dynamo traces the model; the 'eager' backend skips inductor's slow CPU codegen)."""
    import functools

    calls = []
    real_compile = torch.compile

    def compile_eagerly(model, **kwargs):
        calls.append(type(model).__name__)
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", functools.wraps(real_compile)(compile_eagerly))
    config = tiny_config(tmp_path, train={"compile": True}, sched={"epochs": 1}, data={"synthetic_train_size": 16})
    assert train.main(["--config", str(config)]) == 0
    assert calls == ["ResNet", "ResNet"]  # the training forward and the evaluation model
    monkeypatch.undo()
    last = ck.load_checkpoint(tmp_path / "run" / "last.pth")
    assert not any(k.startswith(("_orig_mod", "module.")) for k in last["model"])  # raw module's names
    capsys.readouterr()
    assert eval_script.main(["--checkpoint", str(tmp_path / "run" / "last.pth")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"] == read_log(tmp_path / "run")[0]["val_top1"]


class KilledAt(LoaderWrapper):
    """Wraps a train loader; the process 'dies' (an uncatchable-style exception) while fetching a batch."""

    def __init__(self, inner, epoch: int, at: int):
        self.inner, self.kill_epoch, self.at = inner, epoch, at

    def epoch(self, epoch: int, start_step: int = 0):
        for i, batch in enumerate(self.inner.epoch(epoch, start_step=start_step), start=start_step):
            if epoch == self.kill_epoch and i == self.at:
                raise KeyboardInterrupt("killed")
            yield batch


def test_a_killed_run_loses_only_the_steps_since_its_timed_checkpoint(tmp_path, monkeypatch):
    straight = tiny_config(tmp_path / "a")
    assert train.main(["--config", str(straight)]) == 0

    # save_minutes tiny: last.pth is refreshed after every optimizer step inside the epoch.
    killed = tiny_config(tmp_path / "b", train={"save_minutes": 1e-9})
    real_build = wrap_train_loader(monkeypatch, lambda loader: KilledAt(loader, epoch=1, at=4))
    with pytest.raises(KeyboardInterrupt):
        train.main(["--config", str(killed)])
    run_b = tmp_path / "b" / "run"
    mid = ck.load_checkpoint(run_b / "last.pth")
    assert (mid["epoch"], mid["step_in_epoch"]) == (1, 4)  # the last completed step before the kill
    monkeypatch.setattr(data, "build_loaders", real_build)
    assert train.main(["--config", str(killed)]) == 0
    a = ck.load_checkpoint(tmp_path / "a" / "run" / "last.pth")
    b = ck.load_checkpoint(run_b / "last.pth")
    for key in ("model", "optimizer"):
        assert_same_state(a[key], b[key], key)


def test_eval_every_and_periodic_copies(tmp_path):
    config = tiny_config(
        tmp_path, sched={"epochs": 3}, train={"eval_every": 2, "save_every": 2}, data={"synthetic_train_size": 16}
    )
    assert train.main(["--config", str(config)]) == 0
    log = read_log(tmp_path / "run")
    assert [r.get("val_top1") is not None for r in log] == [False, True, True]  # epoch 2, and the last epoch
    assert log[0]["best_top1"] == -1.0 and log[0]["best_epoch"] == -1
    assert sorted(p.name for p in (tmp_path / "run").glob("epoch_*.pth")) == ["epoch_002.pth"]
    assert ck.load_checkpoint(tmp_path / "run" / "epoch_002.pth")["epoch"] == 2
    assert "Resolved config (also in config.yaml):" in (tmp_path / "run" / "train.log").read_text()


def test_init_from_starts_a_new_run_from_weights_only(tmp_path):
    """train.init_from loads the weights (strictly) and nothing else: a fresh optimizer, epoch 0, a new folder."""
    from engine.build import build_model_for_training
    from engine.config import load_config
    from engine.distributed import DistInfo

    first = tiny_config(tmp_path / "a", sched={"epochs": 1, "warmup_epochs": 0})
    assert train.main(["--config", str(first)]) == 0
    source = tmp_path / "a" / "run" / "last.pth"
    weights = ck.load_checkpoint(source)["model"]
    cfg = load_config(first, [f"train.init_from={source}"])
    model, _ = build_model_for_training(cfg, DistInfo(), cfg.train.init_from)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    second = tiny_config(tmp_path / "b", sched={"epochs": 1, "warmup_epochs": 0}, train={"init_from": str(source)})
    assert train.main(["--config", str(second)]) == 0
    log = (tmp_path / "b" / "run" / "train.log").read_text()
    assert f"Initialised from {source}" in log and "optimizer, schedule, EMA and epoch start fresh" in log
    assert read_log(tmp_path / "b" / "run")[0]["epoch"] == 1
    other = tiny_config(tmp_path / "c", model={"norm": "bn"}, train={"init_from": str(source)})
    with pytest.raises(ck.CheckpointError, match=str(source)):
        train.main(["--config", str(other)])


def test_train_main_leaves_the_callers_logging_as_it_was(tmp_path, caplog):
    """train.main from Python (a notebook, a test) configures its loggers for the run only: afterwards the library
    loggers propagate to the caller's handlers again and no handler of the run (console, train.log) is left."""
    import logging

    before = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate) for name in LIBS}
    assert train.main(["--config", str(tiny_config(tmp_path, sched={"epochs": 1}))]) == 0
    assert "Done." in (tmp_path / "run" / "train.log").read_text()
    for name in LIBS:
        assert (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate) == before[name]
    caplog.set_level(logging.WARNING, logger="data")
    logging.getLogger("data.folder").warning("after the run")
    assert [r.getMessage() for r in caplog.records] == ["after the run"]


LIBS = ("an", "data", "models")
