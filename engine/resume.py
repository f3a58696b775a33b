"""Resuming a run: which checkpoint, what may differ from the run that wrote it, and loading it back.

The resume policy (README "Resuming, preemption, outputs"): a resumed run continues the same experiment.

* Execution settings may change silently (:data:`FREE`): where and how often to save and log, loader
  workers and timeouts, ``train.compile``, ``train.cuda_graph``, ``channels_last``, ``deterministic``, the
  ``dist`` timeouts, and ``train.init_from`` (a resumed run loads its own checkpoint instead).
* A few settings may change with a logged notice (:data:`NOTICED`): ``data.root`` (the data moved),
  ``data.backend``, ``data.crop_pct`` and ``sched.epochs`` (the schedule is a pure function of the optimizer
  step, recomputed for the new length; fewer epochs than already done is refused).
* Everything else defines the experiment and is refused with a message that says how to start a new run:
  the model (name, norm, classes, every option), batch size, optimizer and all its settings, LR schedule
  shape, seed, AMP mode, augmentation, EMA, the number of processes, and the steps per epoch. The
  ``--allow-changes`` flag of ``train.py`` accepts them anyway, logged; a changed optimizer then starts
  from a fresh state.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import models
from engine import checkpoint as ck
from engine import distributed as du
from engine.config import Config
from engine.logs import get_logger
from engine.loop import TrainContext
from engine.optim import lr_at
from engine.run_folder import Position, RunFolder

FREE = {
    "train.output_dir",
    "train.auto_resume",
    "train.save_minutes",
    "train.save_every",
    "train.eval_every",
    "train.val_steps",
    "train.compile",
    "train.cuda_graph",
    "train.init_from",  # the weights a new run starts from; a resumed run loads its checkpoint instead
    "train.channels_last",
    "train.deterministic",
    "data.workers",
    "data.loader_timeout",
    "data.eval_batch_size",
    "dist.backend",
    "dist.timeout_minutes",
    "dist.signal_check_every",
    "dist.recipe_gpus",
}
FREE_PREFIXES = ("log.", "data.dali_")
NOTICED = {
    "data.root": "training goes on with the data at the new root, from the same position",
    "data.backend": "the remaining batches come from another loader, with its own augmentation",
    "data.crop_pct": "validation from here on is not comparable with earlier epochs' (best.pth spans both)",
    "sched.epochs": "the LR schedule is recomputed for the new length from the current optimizer step",
}
TRAINING_STATE = ("optimizer", "epoch", "step_in_epoch", "global_update", "best_top1", "best_epoch")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for section, values in d.items():
        if isinstance(values, dict) and not prefix:
            out.update(_flat(values, f"{section}."))
        else:
            out[f"{prefix}{section}"] = values
    return out


def _plain(value):
    """Tuples as lists, mappings as dicts: a default from a signature compares equal to its YAML spelling."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _with_model_defaults(flat: dict) -> dict:
    """Adds the model's option defaults (a config lists only the options it sets)."""
    try:
        options = models.model_options(flat.get("model.name"))
    except (KeyError, ValueError, TypeError):
        return flat
    return {**{f"model.{k}": _plain(default) for k, (default, _) in options.items()}, **flat}


def config_changes(saved: dict, cfg: Config) -> list[tuple[str, object, object]]:
    """``(key, saved value, new value)`` for every key whose value differs from the checkpoint's config.

    Model options a config leaves out count as their defaults. Other keys the checkpoint does not know
    (written by an older version) are not compared.
    """
    old = _with_model_defaults(_plain(_flat(saved.get("config") or {})))
    new = _with_model_defaults(_plain(_flat(cfg.to_dict())))
    return [(k, old[k], new.get(k)) for k in sorted(old) if old[k] != new.get(k)]


def _describe(changes) -> str:
    return "; ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes)


def check_training_state(saved: dict, path: Path, allow_changes: bool) -> None:
    """A checkpoint to resume from must hold the training state, not only weights."""
    missing = [k for k in TRAINING_STATE if saved.get(k) is None]
    if not missing or (missing == ["optimizer"] and allow_changes):
        return
    raise ck.CheckpointError(
        f"Cannot resume from {path}: it holds model weights but no {', '.join(missing)} (a weights-only file, e.g. "
        f"exported or converted), so training cannot continue exactly where it stopped. Resume from a run "
        f"folder's last.pth (or epoch_NNN.pth) written by train.py"
        + (", or add --allow-changes to continue with a fresh optimizer." if missing == ["optimizer"] else ".")
    )


def check_changes(
    saved: dict, cfg: Config, path: Path, folder: RunFolder, world_size: int, allow_changes: bool
) -> None:
    """Applies the resume policy (module docstring): logs allowed changes, refuses the others."""
    changes = config_changes(saved, cfg)
    saved_world = saved.get("world_size") or len(saved.get("rng") or []) or world_size
    if saved_world != world_size:
        changes.append(("number of processes", saved_world, world_size))
    refused = [c for c in changes if c[0] not in FREE and c[0] not in NOTICED and not c[0].startswith(FREE_PREFIXES)]
    noticed = [c for c in changes if c[0] in NOTICED]
    if saved.get("epoch", 0) > cfg.sched.epochs:
        raise ck.CheckpointError(
            f"Cannot resume from {path}: it has done {saved['epoch']} epochs but sched.epochs is now "
            f"{cfg.sched.epochs}. Resume with sched.epochs >= {saved['epoch']}, or use the checkpoint as it is."
        )
    log = get_logger()
    if refused and not allow_changes:
        raise ck.CheckpointError(
            f"Cannot resume from {path}: its experiment differs from this config in {_describe(refused)}. "
            f"A resumed run continues the same experiment. To start a new run with these settings, give it "
            f"another train.output_dir; to continue this run, drop the changes ({folder.path / 'config.yaml'} is "
            f"the run's config); to resume with them anyway, add --allow-changes (they are logged)."
        )
    if refused:
        log.warning(
            f"Resuming {path} with changes to the experiment, allowed by --allow-changes: {_describe(refused)}."
        )
    for key, old, new in noticed:
        log.warning(f"Resuming with {key} changed from {old!r} to {new!r}: {NOTICED[key]}.")


def find_resume(
    cfg: Config, resume: str | None, folder: RunFolder, world_size: int = 1, allow_changes: bool = False
) -> tuple[dict | None, Path | None]:
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
    check_training_state(saved, path, allow_changes)
    check_changes(saved, cfg, path, folder, world_size, allow_changes)
    return saved, path


def restore_optimizer(saved: dict, path: Path, cfg: Config, ctx: TrainContext, allow_changes: bool) -> None:
    """Loads the optimizer state, unless the optimizer changed (allowed only with --allow-changes)."""
    log = get_logger()
    old_name = (saved.get("config") or {}).get("optim", {}).get("name", cfg.optim.name)
    if saved.get("optimizer") is None or old_name != cfg.optim.name:
        why = "none saved" if saved.get("optimizer") is None else f"optimizer {old_name} -> {cfg.optim.name}"
        log.warning(
            f"The optimizer state of {path} is not loaded ({why}): {cfg.optim.name} starts from a fresh state (no "
            f"momentum or moment estimates) at update {saved.get('global_update', 0)}."
        )
        return
    try:
        ctx.optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError) as e:
        if not allow_changes:
            raise ck.CheckpointError(
                f"The optimizer state in {path} does not fit this run's optimizer ({e}): its parameter groups "
                f"changed (model options or optim.decay_norm). Resume with the run's own config, or add "
                f"--allow-changes to continue with a fresh optimizer state."
            ) from None
        log.warning(f"The optimizer state of {path} does not fit ({e}); starting from a fresh optimizer state.")


def check_steps(saved: dict, path: Path, cfg: Config, ctx: TrainContext, steps: int, allow_changes: bool) -> None:
    """The epoch must have as many steps as when the checkpoint was written; logs a recomputed schedule."""
    old_steps = saved.get("steps_per_epoch")
    if old_steps is not None and old_steps != steps and not allow_changes:
        raise ck.CheckpointError(
            f"Cannot resume from {path}: an epoch now has {steps} steps but had {old_steps} when it was written "
            f"(the training set at data.root, the batch size or the number of processes changed), so the position "
            f"epoch {saved['epoch']}, step {saved['step_in_epoch']} means something else. Resume with the same data, "
            f"start a new run (another train.output_dir), or add --allow-changes."
        )
    old_epochs = (saved.get("config") or {}).get("sched", {}).get("epochs", cfg.sched.epochs)
    if old_epochs != cfg.sched.epochs:
        per_epoch = ctx.schedule.total_steps // cfg.sched.epochs
        old = dataclasses.replace(ctx.schedule, total_steps=old_epochs * per_epoch)
        u = saved["global_update"]
        get_logger().warning(
            f"sched.epochs {old_epochs} -> {cfg.sched.epochs}: the LR for update {u} is {lr_at(u, ctx.schedule):.5g} "
            f"(was {lr_at(u, old):.5g}); the schedule now ends at update {ctx.schedule.total_steps}."
        )


def restore(
    saved: dict,
    path: Path,
    cfg: Config,
    ctx: TrainContext,
    dist_info: du.DistInfo,
    steps_per_epoch: int,
    allow_changes: bool = False,
) -> Position:
    """Loads a checkpoint's model, EMA, optimizer, scaler, counters and this rank's RNG state into ``ctx``."""
    log = get_logger()
    check_steps(saved, path, cfg, ctx, steps_per_epoch, allow_changes)
    ck.load_model_state(ctx.model, saved["model"], path)
    if ctx.ema is not None:
        if saved.get("ema") is not None:
            ctx.ema.load_state_dict(saved["ema"])
        else:
            log.warning(f"{path} has no EMA weights; the EMA restarts from the current weights.")
    restore_optimizer(saved, path, cfg, ctx, allow_changes)
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
