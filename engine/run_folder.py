"""The run folder: its files, the checkpoints written into it, and resuming from them.

A run writes into ``train.output_dir``: ``config.yaml`` (the resolved config), ``log.jsonl`` (one line
per epoch), ``train.log``, ``tb/`` (TensorBoard), ``last.pth``, ``best.pth``, optional ``epoch_NNN.pth``,
``status.json`` and ``summary.json``. Only rank 0 writes.

:class:`Checkpointer` writes ``last.pth`` (at the end of each epoch, at timed checkpoints and at
preemption) and its ``best.pth`` / ``epoch_NNN.pth`` copies; every save is collective and stores every
rank's RNG state, so a run resumed with the same number of processes continues bitwise like an unbroken
one. :func:`find_resume` picks and checks the checkpoint to resume from, :func:`restore` loads it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import checkpoint as ck
from engine import distributed as du
from engine.config import Config
from engine.logs import JsonlWriter, get_logger
from engine.loop import TrainContext


class RunFolder:
    """The files of one run folder; only rank 0 writes."""

    def __init__(self, path: str | Path, is_main: bool):
        self.path = Path(path)
        self.is_main = is_main
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)
        self.log = JsonlWriter(self.path / "log.jsonl")

    @property
    def last(self) -> Path:
        return self.path / "last.pth"

    @property
    def best(self) -> Path:
        return self.path / "best.pth"

    def status(self, state: str, **info) -> None:
        if self.is_main:
            payload = {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
            (self.path / "status.json").write_text(json.dumps(payload, indent=1) + "\n")

    def summarize(self, best_top1: float, best_epoch: int) -> dict:
        """The run's outcome (best and last evaluated epoch, from ``log.jsonl``); rank 0 writes ``summary.json``."""
        last = {}
        if self.log.path.exists():
            lines = [json.loads(x) for x in self.log.path.read_text().splitlines() if x.strip()]
            evaluated = [r for r in lines if r.get("val_top1") is not None]
            last = evaluated[-1] if evaluated else {}
        summary = {
            "best_top1": best_top1,
            "best_epoch": best_epoch,
            "last_top1": last.get("val_top1"),
            "last_top5": last.get("val_top5"),
            "last_epoch": last.get("epoch"),
            "ema_last_top1": last.get("ema_top1"),
        }
        if self.is_main:
            (self.path / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary


@dataclass
class Position:
    """Where training stands: the next epoch and step to run, and the best validation top-1 so far."""

    epoch: int = 0
    step: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1


# ----------------------------------------------------------------------------------------------------
# Resuming.
# ----------------------------------------------------------------------------------------------------


def check_same_experiment(saved: dict, cfg: Config, path: Path) -> None:
    s = saved.get("config", {}).get("model", {})
    for key in ("name", "norm", "num_classes"):
        if key in s and s[key] != getattr(cfg.model, key):
            raise ck.CheckpointError(
                f"Cannot resume from {path}: it was trained with model.{key}={s[key]!r} but this config says "
                f"{getattr(cfg.model, key)!r}. Choose another train.output_dir for a new experiment, or pass "
                f"the original config."
            )


def find_resume(cfg: Config, resume: str | None, folder: RunFolder) -> tuple[dict | None, Path | None]:
    """The checkpoint to resume from (``resume``, else ``last.pth`` of the run folder), loaded and checked.

    Decided before anything heavy is built, so that a wrong folder fails fast; an existing run is never
    overwritten silently.
    """
    if resume:
        path = Path(resume)
    elif cfg.train.auto_resume and folder.last.exists():
        path = folder.last
    elif folder.last.exists():
        raise SystemExit(
            f"{folder.last} exists but train.auto_resume is false: refusing to overwrite an earlier run. Pass "
            f"--resume {folder.last}, set train.auto_resume=true, or choose another train.output_dir."
        )
    else:
        return None, None
    saved = ck.load_checkpoint(path, map_location="cpu")
    check_same_experiment(saved, cfg, path)
    return saved, path


def restore(
    saved: dict, path: Path, cfg: Config, ctx: TrainContext, dist_info: du.DistInfo, steps_per_epoch: int
) -> Position:
    """Loads a checkpoint's model, EMA, optimizer, scaler, counters and this rank's RNG state into ``ctx``."""
    log = get_logger()
    ck.load_model_state(ctx.model, saved["model"], path)
    if ctx.ema is not None:
        if saved.get("ema") is not None:
            ctx.ema.load_state_dict(saved["ema"])
        else:
            log.warning(f"{path} has no EMA weights; the EMA restarts from the current weights.")
    ctx.optimizer.load_state_dict(saved["optimizer"])
    if ctx.scaler is not None and saved.get("scaler") is not None:
        ctx.scaler.load_state_dict(saved["scaler"])
    ctx.global_update = saved["global_update"]
    ctx.meters = dict(saved.get("meters") or {})
    pos = Position(saved["epoch"], saved["step_in_epoch"], saved["best_top1"], saved["best_epoch"])
    rng = saved.get("rng") or []
    if len(rng) == dist_info.world_size:
        ck.restore_rng(rng[dist_info.rank])
    else:
        ck.seed_everything(cfg.train.seed + dist_info.rank + 1000 * ctx.global_update)
        log.warning(
            f"{path} holds the RNG states of {len(rng)} process(es) but this run has {dist_info.world_size}: RNG "
            f"streams reseeded, so random augmentation (mixup, dropout) differs from an unbroken run."
        )
    if pos.step >= steps_per_epoch:
        pos.epoch, pos.step = pos.epoch + 1, 0
    log.info(f"Resumed from {path}: epoch {pos.epoch}, step {pos.step}, update {ctx.global_update}.")
    return pos


# ----------------------------------------------------------------------------------------------------
# Saving.
# ----------------------------------------------------------------------------------------------------


def gather_rng(dist_info: du.DistInfo) -> list:
    """Every rank's RNG state, in rank order (collective: all ranks must call it)."""
    state = ck.capture_rng()
    if not du.is_initialized():
        return [state]
    states = [None] * dist_info.world_size
    torch.distributed.all_gather_object(states, state)
    return states


class Checkpointer:
    """Writes a run's checkpoints: ``last.pth`` (atomically), ``best.pth`` and ``epoch_NNN.pth`` copies.

    :meth:`save` is collective (it gathers every rank's RNG state; rank 0 writes, then all ranks wait), so
    all ranks call it at the same step. Timed checkpoints inside an epoch: :meth:`timed_save_due` is rank
    0's clock (every ``train.save_minutes``), which the loop shares with the other ranks at the next
    preemption check (``engine.distributed.PreemptionHandler.agree``) so that every rank saves at that step.
    """

    def __init__(
        self,
        cfg: Config,
        folder: RunFolder,
        dist_info: du.DistInfo,
        ctx: TrainContext,
        classes: list[str] | None = None,
    ):
        self.cfg, self.folder, self.dist_info, self.ctx = cfg, folder, dist_info, ctx
        self.last_time = time.monotonic()
        # Provenance cannot change during a run: computed once, not at every save. `classes`: the training set's
        # class folder names in label order (None for synthetic data), which eval.py checks a dataset against.
        self.provenance = {
            "config": cfg.to_dict(),
            "classes": list(classes) if classes is not None else None,
            "git_rev": ck.git_revision(),
            "versions": ck.versions(),
        }

    def state(self, epoch: int, step_in_epoch: int, pos: Position, rng: list) -> dict:
        """The checkpoint dict (see engine/checkpoint.py for its layout)."""
        ctx = self.ctx
        return {
            "model": ctx.model.state_dict(),
            "ema": ctx.ema.state_dict() if ctx.ema is not None else None,
            "optimizer": ctx.optimizer.state_dict(),
            "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_update": ctx.global_update,
            "best_top1": pos.best_top1,
            "best_epoch": pos.best_epoch,
            "meters": dict(ctx.sync_meters()) if step_in_epoch else {},
            "rng": rng,
            **self.provenance,
        }

    def save(self, epoch: int, step_in_epoch: int, pos: Position, improved: bool = False) -> None:
        """Writes ``last.pth`` for the point (``epoch``, ``step_in_epoch``), plus its copies (collective)."""
        rng = gather_rng(self.dist_info)
        if self.dist_info.is_main:
            ck.save_atomic(self.state(epoch, step_in_epoch, pos, rng), self.folder.last)
            if improved:
                ck.copy_atomic(self.folder.last, self.folder.best)
            every = self.cfg.train.save_every
            if step_in_epoch == 0 and every and epoch % every == 0:
                ck.copy_atomic(self.folder.last, self.folder.path / f"epoch_{epoch:03d}.pth")
        self.last_time = time.monotonic()
        du.barrier()

    def timed_save_due(self) -> bool:
        """Rank 0: ``train.save_minutes`` have passed since the last save and the weights are finite.

        Other ranks answer False without looking at their clocks: rank 0's decision is shared with them
        (see the class docstring), so no rank waits for the clock of another.
        """
        minutes = self.cfg.train.save_minutes
        if minutes <= 0 or not self.dist_info.is_main or time.monotonic() - self.last_time < minutes * 60:
            return False
        # Never write weights that diverged.
        return all(bool(torch.isfinite(p).all()) for p in self.ctx.model.parameters())
