"""Engine pieces: the LR schedule, checkpoints (atomicity, safe loading, errors), RNG capture, EMA, signals."""

from __future__ import annotations

import itertools
import math
import os
import random
import signal

import numpy as np
import pytest
import torch
from torch import nn

from engine import checkpoint as ck
from engine.config import ConfigError, config_from_dict
from engine.distributed import PreemptionHandler, ranks_consistent, state_digest, world_info_from_env
from engine.optim import ApexMissingError, ModelEma, Schedule, build_optimizer, lr_at, make_schedule, scaled_lr

# ---------------------------------------------------------------------------------------------------
# Schedule.
# ---------------------------------------------------------------------------------------------------


def official_lr(epoch: int, i: int, iters: int, peak: float, warmup_epochs: int, epochs: int) -> float:
    """The official recipe's LR for iteration ``i`` of ``epoch`` (both 0-based): it is evaluated after ``i + 1``
    iterations of the epoch; linear warm-up by epoch fraction, then cosine to 0 (docs/AN.md 4.1)."""
    done = epoch + (i + 1) / iters  # epochs completed at the end of this iteration
    if epoch < warmup_epochs:
        return peak * done / warmup_epochs
    return peak * (1 + math.cos(math.pi * (done - warmup_epochs) / (epochs - warmup_epochs))) / 2


def test_lr_at_follows_the_official_schedule():
    # 10 iterations per epoch, 5 warm-up epochs, 12 epochs: W = 50, T = 120 steps.
    s = Schedule(peak_lr=0.4, total_steps=120, warmup_steps=50, warmup_start_factor=0.0, min_lr=0.0)
    assert lr_at(0, s) == pytest.approx(0.008)  # first step trains: 0.4 * 1 / 50
    assert lr_at(24, s) == pytest.approx(0.2)  # 25 of 50 warm-up steps
    assert lr_at(49, s) == pytest.approx(0.4)  # last warm-up step reaches the peak
    assert lr_at(50, s) == pytest.approx(0.2 * (1 + math.cos(math.pi / 70)))  # first cosine step: 1 of 70
    assert lr_at(84, s) == pytest.approx(0.2)  # 35 of 70 cosine steps: halfway
    assert lr_at(119, s) == pytest.approx(0.0, abs=1e-15)  # last step: the cosine has reached 0
    assert lr_at(5000, s) == pytest.approx(0.0, abs=1e-15)  # clamped past the end
    for step in range(120):
        epoch, i = divmod(step, 10)
        assert lr_at(step, s) == pytest.approx(official_lr(epoch, i, 10, 0.4, 5, 12), rel=1e-12, abs=1e-15), step


def test_lr_schedule_shape_and_floor():
    s = Schedule(peak_lr=1.0, total_steps=200, warmup_steps=20, warmup_start_factor=0.01, min_lr=1e-3)
    lrs = [lr_at(i, s) for i in range(201)]
    assert lrs[0] == pytest.approx(0.01 + 0.99 / 20)  # starts one step into the warm-up
    assert lrs[19] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(lrs[:20]))  # warm-up increases
    assert all(a > b for a, b in itertools.pairwise(lrs[19:200]))  # then decreases to the floor
    assert lrs[199] == pytest.approx(1e-3) and lrs[200] == pytest.approx(1e-3)
    const = Schedule(peak_lr=0.5, total_steps=100, warmup_steps=0, name="constant")
    assert {lr_at(i, const) for i in range(100)} == {0.5}
    no_warmup = Schedule(peak_lr=0.5, total_steps=100, warmup_steps=0)
    assert lr_at(0, no_warmup) == pytest.approx(0.25 * (1 + math.cos(math.pi / 100)))


def test_make_schedule_scales_lr_by_global_batch():
    cfg = config_from_dict(
        {
            "optim": {"lr": 0.1, "accum_steps": 2},
            "data": {"batch_size": 128},
            "sched": {"epochs": 120, "warmup_epochs": 5},
        }
    )
    s = make_schedule(cfg, steps_per_epoch=1000, world_size=4)
    assert s.peak_lr == pytest.approx(scaled_lr(0.1, 128 * 4 * 2))  # 0.1 x 1024 / 256 = 0.4
    assert s.peak_lr == pytest.approx(0.4)
    assert s.total_steps == 120 * 500 and s.warmup_steps == 5 * 500  # counted in optimizer steps


def test_apex_optimizers_without_apex_are_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_apex(name, *args, **kwargs):
        if name == "apex" or name.startswith("apex."):
            raise ImportError("No module named 'apex'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_apex)
    for name in ("apex_sgd", "apex_lamb"):
        cfg = config_from_dict({"optim": {"name": name}})
        with pytest.raises(ApexMissingError, match=rf"optim.name='{name}' needs NVIDIA apex.*optim.name=sgd"):
            build_optimizer(nn.Linear(2, 2), cfg, lr=0.1)
    assert issubclass(ApexMissingError, ConfigError)  # reported like any config error by train.py


def test_native_optimizers_use_the_weight_decay_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    cfg = config_from_dict({"optim": {"name": "sgd", "nesterov": True, "weight_decay": 1e-4, "decay_norm": False}})
    opt = build_optimizer(model, cfg, lr=0.2)
    assert isinstance(opt, torch.optim.SGD) and all(g["nesterov"] and g["lr"] == 0.2 for g in opt.param_groups)
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay["weight"] == 1e-4 and decay["norm"] == 0.0
    cfg = config_from_dict({"optim": {"name": "adamw", "betas": [0.9, 0.95]}})
    opt = build_optimizer(model, cfg, lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.9, 0.95)


# ---------------------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------------------


def small_checkpoint() -> dict:
    model = nn.Linear(4, 3)
    return {
        "model": model.state_dict(),
        "epoch": 1,
        "rng": [ck.capture_rng()],
        "config": {"model": {"name": "x"}},
        "versions": ck.versions(),
        "git_rev": ck.git_revision(),
    }


def test_save_atomic_round_trip_and_weights_only(tmp_path):
    path = ck.save_atomic(small_checkpoint(), tmp_path / "last.pth")
    loaded = ck.load_checkpoint(path)
    assert loaded["epoch"] == 1 and set(loaded["model"]) == {"weight", "bias"}
    torch.load(path, weights_only=True)  # the format itself is weights_only-safe
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary left behind


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = ck.save_atomic(small_checkpoint(), tmp_path / "last.pth")
    before = path.read_bytes()

    def exploding_save(obj, f):
        f.write(b"partial garbage")
        raise KeyboardInterrupt  # a kill in the middle of torch.save

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_atomic({"model": {}, "epoch": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_missing_empty_truncated_and_foreign_checkpoints(tmp_path):
    with pytest.raises(ck.CheckpointError, match=r"does not exist"):
        ck.load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match=r"empty.pth is empty"):
        ck.load_checkpoint(tmp_path / "empty.pth")
    good = ck.save_atomic(small_checkpoint(), tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(good[: len(good) // 2])
    with pytest.raises(ck.CheckpointError, match=r"cut.pth is truncated or corrupt"):
        ck.load_checkpoint(tmp_path / "cut.pth")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pth")
    with pytest.raises(ck.CheckpointError, match=r"not a checkpoint of this framework"):
        ck.load_checkpoint(tmp_path / "plain.pth")
    torch.save({"model": {}, "evil": ck.CheckpointError("x")}, tmp_path / "pickled.pth")
    with pytest.raises(ck.CheckpointError, match=r"holds a pickled Python object \(engine\.checkpoint\.Checkpoint"):
        ck.load_checkpoint(tmp_path / "pickled.pth")
    with pytest.raises(ck.CheckpointError, match=r"is a folder"):
        ck.load_checkpoint(tmp_path)


def test_load_model_state_mismatch_names_the_file():
    state = nn.Sequential(nn.Linear(4, 3)).state_dict()
    with pytest.raises(ck.CheckpointError, match=r"ckpt.pth do not fit this model.*other shapes"):
        ck.load_model_state(nn.Sequential(nn.Linear(4, 5)), state, "ckpt.pth")
    with pytest.raises(ck.CheckpointError, match=r"missing.*unexpected"):
        ck.load_model_state(nn.Sequential(nn.Identity(), nn.Linear(4, 3)), state, "ckpt.pth")


def test_rng_capture_restore_round_trip(tmp_path):
    state = ck.capture_rng()
    path = ck.save_atomic({"model": {}, "rng": [state]}, tmp_path / "r.pth")
    first = (random.random(), np.random.rand(), torch.rand(3), np.random.randn())
    ck.restore_rng(ck.load_checkpoint(path)["rng"][0])
    second = (random.random(), np.random.rand(), torch.rand(3), np.random.randn())
    assert first[0] == second[0] and first[1] == second[1] and first[3] == second[3]
    assert torch.equal(first[2], second[2])


# ---------------------------------------------------------------------------------------------------
# EMA, signals, environment.
# ---------------------------------------------------------------------------------------------------


def test_model_ema_matches_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.9)
    reference = [p.detach().clone() for p in model.parameters()]
    for n in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 3))  # moves the BN buffers
        d = min(0.9, (1 + n) / (10 + n))
        reference = [d * r + (1 - d) * p.detach() for r, p in zip(reference, model.parameters())]
        ema.update(model)
    for r, e in zip(reference, ema.module.parameters()):
        torch.testing.assert_close(e, r)
    torch.testing.assert_close(ema.module[1].running_mean, model[1].running_mean)
    assert int(ema.num_updates) == 5


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_handler_flags_at_check_steps(signum):
    with PreemptionHandler(torch.device("cpu"), check_every=5) as handler:
        assert not handler.should_stop(5)
        os.kill(os.getpid(), signum)
        assert not handler.should_stop(7)  # only checked every 5 steps, so all ranks agree on the step
        assert handler.should_stop(10)
        assert handler.should_stop(3, force_sync=True)
    assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler) or callable(
        signal.getsignal(signum)
    )


def test_preemption_handler_agrees_on_stop_and_timed_save():
    with PreemptionHandler(torch.device("cpu"), check_every=3) as handler:
        assert [u for u in range(10) if handler.is_check_step(u)] == [0, 3, 6, 9]
        assert handler.agree() == (False, False)
        assert handler.agree(save_due=True) == (False, True)
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.agree() == (True, False)


def test_state_digest_sees_every_parameter_and_buffer():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    b.load_state_dict(a.state_dict())
    assert state_digest(a) == state_digest(b) and ranks_consistent(a)
    b[1].num_batches_tracked += 1  # a 0-dim integer buffer
    assert state_digest(a) != state_digest(b)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b[0].weight[0, 0, 0, 0] = torch.nextafter(b[0].weight[0, 0, 0, 0], torch.tensor(2.0))  # one ulp
    assert state_digest(a) != state_digest(b)


def test_world_info_from_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    assert world_info_from_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert world_info_from_env() == (0, 1, 0)  # srun-native mode needs MASTER_ADDR from the batch script
    monkeypatch.setenv("MASTER_ADDR", "node1")
    assert world_info_from_env() == (9, 16, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert world_info_from_env() == (3, 8, 3)  # torchrun's variables win
