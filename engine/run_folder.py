"""The run folder: its files, one run at a time in it, and the checkpoints written into it.

A run writes into ``train.output_dir``: ``config.yaml`` (the resolved config), ``log.jsonl`` (one line
per epoch), ``train.log``, ``tb/`` (TensorBoard), ``last.pth``, ``best.pth``, optional ``epoch_NNN.pth``,
``status.json``, ``summary.json`` and ``.lock``. Only rank 0 writes.

:meth:`RunFolder.open` creates the folder, takes its lock (``engine/run_lock.py``: a second run into the
same folder stops with an error naming the first) and removes the temporary files of saves that a
killed run left behind. :class:`Checkpointer` writes ``last.pth`` (at the end of each epoch, at timed
checkpoints and at preemption) and makes ``best.pth`` / ``epoch_NNN.pth`` the same file; every save is
collective, stores every rank's RNG state (so a resumed run continues bitwise like an unbroken one), and
is refused when the state diverged (``engine/health.py``).

``last.pth`` is the commit point of an epoch: it is written first, then ``best.pth``, then the epoch's
``log.jsonl`` line, and ``summary.json`` at the end of the run. The checkpoint also holds the epoch's log
record, so :meth:`RunFolder.repair` can redo what a kill between these writes left undone; ``best.pth``
is therefore never behind ``log.jsonl`` or ``summary.json``. Resuming is ``engine/resume.py``.
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import checkpoint as ck
from engine import distributed as du
from engine import faults, health
from engine.config import Config
from engine.logs import JsonlWriter, get_logger
from engine.loop import TrainContext
from engine.run_lock import RunFolderError, RunLock, unwritable_message

STATUS_FILE_ENV = "AN_STATUS_FILE"  # a second file to write status.json to (the launch scripts read it)


class RunFolder:
    """The files of one run folder; only rank 0 writes. Open it with :meth:`open`."""

    def __init__(self, path: str | Path, is_main: bool):
        self.path = Path(path)
        self.is_main = is_main
        self.log = JsonlWriter(self.path / "log.jsonl")
        self.lock: RunLock | None = None
        self.removed: list[str] = []  # stale temporary files removed at start

    @classmethod
    def open(cls, path: str | Path, dist_info: du.DistInfo) -> RunFolder:
        """Rank 0 creates the folder, locks it and removes stale temporary files (collective).

        Raises :class:`RunFolderError` on every rank when rank 0 cannot: the folder is a file, cannot be
        created or written, or another run holds it.
        """
        folder = cls(path, dist_info.is_main)
        error = None
        if folder.is_main:
            try:
                folder._claim()
            except RunFolderError as e:
                error = str(e)
        error = du.broadcast_from_main(error)
        if error is not None:
            folder.close()
            raise RunFolderError(error)
        return folder

    def _claim(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(unwritable_message(self.path, e)) from None
        self.lock = RunLock.acquire(self.path)
        for tmp in ck.temporary_files(self.path):  # left by saves of a killed run; nobody else writes here
            tmp.unlink(missing_ok=True)
            self.removed.append(tmp.name)

    def close(self) -> None:
        """Releases the folder's lock (the process ending releases it too)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @property
    def last(self) -> Path:
        return self.path / "last.pth"

    @property
    def best(self) -> Path:
        return self.path / "best.pth"

    def status(self, state: str, **info) -> None:
        """Rank 0 writes ``status.json`` (atomically), and the file named by ``$AN_STATUS_FILE`` if set."""
        if not self.is_main:
            return
        payload = {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        text = json.dumps(payload, indent=1) + "\n"
        for target in filter(None, (self.path / "status.json", os.environ.get(STATUS_FILE_ENV))):
            try:
                ck.write_text_atomic(target, text)
            except OSError as e:
                get_logger().warning(f"Could not write {target} ({os.strerror(e.errno or 0)}): state '{state}'.")

    def summarize(self, best_top1: float, best_epoch: int) -> dict:
        """The run's outcome (best and last evaluated epoch, from ``log.jsonl``); rank 0 writes ``summary.json``."""
        evaluated = [r for r in self.log.records() if r.get("val_top1") is not None]
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
            ck.write_text_atomic(self.path / "summary.json", json.dumps(summary, indent=1) + "\n")
        return summary

    def repair(self, saved: dict, path: Path, save_every: int) -> None:
        """Rank 0, resuming from this folder's ``last.pth``: redoes the writes a kill cut off after it.

        ``last.pth`` of an epoch end is written first; a kill before its ``best.pth`` link, its
        ``epoch_NNN.pth`` link or its ``log.jsonl`` line leaves them behind, and they are redone here
        from the checkpoint (which carries the epoch's log record).
        """
        if not self.is_main or not path.exists() or not os.path.samefile(path, self.last):
            return
        epoch, step, log = saved["epoch"], saved["step_in_epoch"], get_logger()
        if step != 0:
            return
        links = [self.best] if saved.get("best_epoch") == epoch else []
        if save_every and epoch % save_every == 0:
            links.append(self.path / f"epoch_{epoch:03d}.pth")
        for target in links:
            if not target.exists() or not ck.same_checkpoint(self.last, target):
                ck.link_atomic(self.last, target)
                log.warning(
                    f"{target.name} was behind last.pth (a save was cut off): made it last.pth of epoch {epoch}."
                )
        record = saved.get("record")
        if record is not None and all(r.get("epoch", 0) < epoch for r in self.log.records()):
            self.log.write(record)
            log.warning(f"log.jsonl lacked epoch {epoch} (a save was cut off): line restored from last.pth.")


@dataclass
class Position:
    """Where training stands: the next epoch and step to run, and the best validation top-1 so far."""

    epoch: int = 0
    step: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1


# ----------------------------------------------------------------------------------------------------
# Saving.
# ----------------------------------------------------------------------------------------------------


class UnsafeStateError(RuntimeError):
    """The training state diverged (non-finite or exploded); it was not saved and the run must stop."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, folder gone or read-only); earlier ones are intact."""


def gather_rng(dist_info: du.DistInfo) -> list:
    """Every rank's RNG state, in rank order (collective: all ranks must call it)."""
    state = ck.capture_rng()
    if not du.is_initialized():
        return [state]
    states = [None] * dist_info.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def write_failure_fix(folder: Path, e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"Free space on the filesystem of {folder} (df -h {folder}), or move the run folder to a larger disk"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"Make {folder} writable again"
    return f"Check the filesystem of {folder} (is it mounted and writable?)"


class Checkpointer:
    """Writes a run's checkpoints: ``last.pth`` (atomically), and ``best.pth`` / ``epoch_NNN.pth`` as links to it.

    :meth:`save` is collective (it checks the state on every rank, gathers every rank's RNG state, rank 0
    writes, and every rank learns whether the write succeeded), so all ranks call it at the same step.
    Timed checkpoints inside an epoch: :meth:`timed_save_due` is rank 0's clock (every
    ``train.save_minutes``), which the loop shares with the other ranks at the next preemption check
    (``engine.distributed.PreemptionHandler.agree``) so that every rank saves at that step.
    """

    def __init__(
        self,
        cfg: Config,
        folder: RunFolder,
        dist_info: du.DistInfo,
        ctx: TrainContext,
        steps_per_epoch: int,
        classes: list[str] | None = None,
    ):
        self.cfg, self.folder, self.dist_info, self.ctx = cfg, folder, dist_info, ctx
        self.last_time = time.monotonic()
        self.reference_max = health.max_weight(ctx.model)  # the weights' scale at the last save (or now)
        self.on_disk = "none yet" if not folder.last.exists() else "written before this process started"
        # Provenance cannot change during a run: computed once, not at every save. `classes`: the training set's
        # class folder names in label order (None for synthetic data), which eval.py checks a dataset against.
        self.provenance = {
            "config": cfg.to_dict(),
            "classes": list(classes) if classes is not None else None,
            "git_rev": ck.git_revision(),
            "versions": ck.versions(),
            "world_size": dist_info.world_size,
            "steps_per_epoch": steps_per_epoch,
        }

    def resumed_from(self, pos: Position) -> None:
        self.on_disk = f"epoch {pos.epoch}, step {pos.step}"

    def describe_last(self) -> str:
        """The checkpoint on disk, for messages: its path and training position."""
        return f"{self.folder.last} ({self.on_disk})"

    def state(self, epoch: int, step_in_epoch: int, pos: Position, rng: list, record: dict | None) -> dict:
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
            "record": record,  # the epoch's log.jsonl line (end-of-epoch saves), for RunFolder.repair
            **self.provenance,
        }

    def save(self, epoch: int, step_in_epoch: int, pos: Position, record: dict | None = None) -> None:
        """Writes ``last.pth`` for the point (``epoch``, ``step_in_epoch``), plus its links (collective).

        Raises :class:`UnsafeStateError` (nothing written) when the state diverged, and
        :class:`CheckpointWriteError` when the write failed; the checkpoint on disk is intact either way.
        """
        problem, weight = health.check_state(self.ctx, self.cfg.model.num_classes, self.reference_max)
        if problem is not None:
            raise UnsafeStateError(
                f"Refusing to save a checkpoint at epoch {epoch}, step {step_in_epoch}: {problem}. The run stops "
                f"here. The checkpoint on disk, {self.describe_last()}, passed the same checks when it was "
                f"written. Lower optim.lr or lengthen sched.warmup_epochs, set optim.clip_grad (e.g. 5.0) or use "
                f"train.amp=bf16 rather than fp16; then run the same command to resume from that checkpoint."
            )
        rng = gather_rng(self.dist_info)
        error = None
        if self.dist_info.is_main:
            improved = record is not None and record.get("best_epoch") == epoch
            error = self._write(self.state(epoch, step_in_epoch, pos, rng, record), epoch, step_in_epoch, improved)
        error = du.broadcast_from_main(error)  # also the barrier that keeps the ranks together
        if error is not None:
            raise CheckpointWriteError(error)
        self.reference_max = weight  # the weights saved just now
        if self.ctx.loss_peak is not None:
            self.ctx.loss_peak.zero_()
        self.on_disk = f"epoch {epoch}, step {step_in_epoch}"
        self.last_time = time.monotonic()

    def _write(self, state: dict, epoch: int, step_in_epoch: int, improved: bool) -> str | None:
        """Rank 0: writes last.pth, then its links; returns the error message of a failed write, or None."""
        folder, target = self.folder, self.folder.last
        try:
            ck.save_atomic(state, target)
            faults.at("save:last")
            if improved:
                target = folder.best
                ck.link_atomic(folder.last, target)
                faults.at("save:best")
            every = self.cfg.train.save_every
            if step_in_epoch == 0 and every and epoch % every == 0:
                target = folder.path / f"epoch_{epoch:03d}.pth"
                ck.link_atomic(folder.last, target)
        except OSError as e:
            kept = (
                self.describe_last()
                if target == folder.last
                else f"{folder.last} (epoch {epoch}, step {step_in_epoch})"
            )
            return (
                f"Could not write the checkpoint {target}: {os.strerror(e.errno) if e.errno else e}. The checkpoint "
                f"on disk, {kept}, is intact, as is every earlier one. {write_failure_fix(folder.path, e)}; then run "
                f"the same command to resume from it."
            )
        return None

    def timed_save_due(self) -> bool:
        """Rank 0: ``train.save_minutes`` have passed since the last save.

        Other ranks answer False without looking at their clocks: rank 0's decision is shared with them
        (see the class docstring), so no rank waits for the clock of another. Whether the state may be
        saved is checked by :meth:`save` itself.
        """
        minutes = self.cfg.train.save_minutes
        return minutes > 0 and self.dist_info.is_main and time.monotonic() - self.last_time >= minutes * 60
