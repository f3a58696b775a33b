"""Train an ImageNet classifier with a pluggable normalization (BN, GN, SN, SE, AN, ...).

One process (CPU or one GPU)::

    python train.py --config demo_digits.yaml
    python train.py --config resnet50_an.yaml data.root=/data/imagenet optim.lr=0.1

One node, 8 GPUs (DDP over NCCL; gloo when there is no GPU)::

    torchrun --standalone --nproc_per_node 8 train.py --config resnet50_an.yaml

Several nodes: ``scripts/slurm/train.sbatch`` (torchrun per node with c10d rendezvous, or one srun task
per GPU). A run writes into ``train.output_dir``: ``config.yaml`` (the resolved config), ``log.jsonl``
(one line per epoch), ``train.log``, ``tb/`` (TensorBoard), ``last.pth``, ``best.pth``, optional
``epoch_NNN.pth``, ``status.json`` and ``summary.json``. Starting the same command again resumes from
``last.pth``. SIGTERM, SIGINT or SIGUSR1 make every rank stop at the same step, checkpoint, and exit with
status 75 (``status.json`` says ``preempted``). One run at a time writes into a folder (``.lock``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

import data
import models
from engine import checkpoint as ck
from engine import distributed as du
from engine import faults
from engine.build import (
    build_loaders,
    build_model,
    build_model_for_training,
    build_train_context,
    check_num_classes,
    configure_torch,
    expand_path,
)
from engine.config import Config, check_training, load_config
from engine.errors import main_guard
from engine.logs import AttentionProbe, Progress, TensorBoard, get_logger, logging_to, peak_memory_mb
from engine.loop import (
    LossWindow,
    NonFiniteLossError,
    TrainContext,
    begin_epoch,
    check_finite,
    epoch_batches,
    epoch_metrics,
    evaluate,
    train_step,
)
from engine.optim import make_schedule
from engine.resume import find_resume, restore
from engine.run_folder import Checkpointer, CheckpointWriteError, Position, RunFolder, UnsafeStateError

IMAGENET_TRAIN_IMAGES = 1_281_167


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, or a name in configs/ (e.g. resnet50_an.yaml)")
    parser.add_argument("--resume", default=None, help="checkpoint to resume from (default: OUTPUT_DIR/last.pth)")
    parser.add_argument("--dry-run", action="store_true", help="print model, batch, LR and steps, then exit")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument(
        "--allow-changes",
        action="store_true",
        help="resume even though the config changes the experiment (batch, LR, optimizer, ...); the changes are logged",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=0.2 (any position)")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Trains; a bad input raises a user error (see engine/errors.py; ``main_guard`` prints it, exit status 2)."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    check_training(cfg, du.device_type(args.device), str(args.config))
    cfg.data.root = expand_path(cfg.data.root)
    if args.dry_run:
        return dry_run(cfg)
    dist_info = du.init_distributed(cfg.dist.backend, cfg.dist.timeout_minutes, device=args.device)
    try:
        return run(cfg, args, dist_info)
    finally:
        du.cleanup()


def dry_run(cfg: Config) -> int:
    """Resolves the config, builds the model and prints what a real run would do, without any data."""
    world = du.world_info_from_env()[1]
    model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    macs = models.count_macs(model, cfg.data.img_size)
    try:
        n_train, counted = data.count_train_images(cfg), "counted"
    except data.DatasetError:
        n_train, counted = IMAGENET_TRAIN_IMAGES, f"assumed: ImageNet-1k, no dataset at '{cfg.data.root}'"
    steps = data.steps_per_epoch(cfg, n_train, world)
    schedule = make_schedule(cfg, steps, world)
    global_batch = cfg.data.batch_size * world * cfg.optim.accum_steps
    print(cfg.dump())
    print(f"model          {cfg.model.name} (norm={cfg.model.norm}, classes={cfg.model.num_classes})")
    print(f"parameters     {params:,} ({params / 1e6:.3f}M)")
    print(f"MACs           {macs / 1e9:.3f}G at {cfg.data.img_size}x{cfg.data.img_size}")
    print(
        f"global batch   {global_batch} = {cfg.data.batch_size} per GPU x {world} processes x {cfg.optim.accum_steps}"
    )
    print(f"peak LR        {schedule.peak_lr:.5g} = {cfg.optim.lr} x {global_batch} / {cfg.optim.base_batch_size}")
    print(f"train images   {n_train:,} ({counted})")
    print(f"steps          {steps} per epoch, {schedule.total_steps} optimizer steps, {schedule.warmup_steps} warm-up")
    print(f"output         {cfg.train.output_dir}")
    return 0


@dataclass
class Run:
    """What one run wires together, built once by :func:`run` and handed to the loop below."""

    cfg: Config
    dist_info: du.DistInfo
    folder: RunFolder
    ctx: TrainContext
    loaders: data.Loaders
    eval_model: nn.Module  # the raw model, or its torch.compile wrapper; never DDP
    steps_per_epoch: int
    tb: TensorBoard
    preempt: du.PreemptionHandler
    saver: Checkpointer


def run(cfg: Config, args, dist_info: du.DistInfo) -> int:
    """Opens the run folder (one run per folder), catches preemption signals from here on, then sets up and trains."""
    folder = RunFolder.open(cfg.train.output_dir, dist_info)  # first: a second run into the folder touches nothing
    try:
        with (
            logging_to(dist_info.rank, folder.path if dist_info.is_main else None),
            du.PreemptionHandler(dist_info.device, cfg.dist.signal_check_every) as preempt,
        ):
            return set_up_and_fit(cfg, args, dist_info, folder, preempt)
    finally:
        folder.close()


def set_up_and_fit(cfg: Config, args, dist_info: du.DistInfo, folder: RunFolder, preempt: du.PreemptionHandler) -> int:
    """Builds the run (model, data, optimizer), resumes it when there is a checkpoint, then trains it."""
    if folder.removed:
        get_logger().info(
            f"Removed {len(folder.removed)} temporary file(s) of saves cut off: {', '.join(folder.removed)}"
        )
    configure_torch(cfg, dist_info.rank)
    # Before anything heavy: a wrong folder or a changed experiment fails fast.
    saved, resume_path = find_resume(cfg, args.resume, folder, dist_info.world_size, args.allow_changes)
    if saved is not None and cfg.train.init_from:
        get_logger().info(f"train.init_from is ignored: resuming from {resume_path}.")
    model, ema = build_model_for_training(cfg, dist_info, cfg.train.init_from if saved is None else None)
    loaders = build_loaders(cfg, dist_info)
    try:
        check_num_classes(cfg, loaders)
        steps = loaders.steps_per_epoch
        ctx, eval_model = build_train_context(cfg, dist_info, model, ema, steps)
        pos = Position()
        if saved is not None:
            pos = restore(saved, resume_path, cfg, ctx, dist_info, steps, args.allow_changes)
            if dist_info.is_main:
                folder.log.truncate_after(pos.epoch)
                folder.repair(saved, resume_path, cfg.train.save_every)
        tb = TensorBoard(folder.path / "tb", enabled=cfg.log.tensorboard and dist_info.is_main)
        saver = Checkpointer(cfg, folder, dist_info, ctx, steps, classes=loaders.class_names)
        if saved is not None:
            saver.resumed_from(Position(saved["epoch"], saved["step_in_epoch"]))
        r = Run(cfg, dist_info, folder, ctx, loaders, eval_model, steps, tb, preempt, saver)
        if dist_info.is_main:
            announce(r)
        try:
            return fit(r, pos)
        finally:
            r.tb.close()
    finally:
        loaders.close()


def announce(r: Run) -> None:
    """Rank 0: saves the resolved config and logs the run's shape (and a recipe-size warning)."""
    cfg, log = r.cfg, get_logger()
    ck.write_text_atomic(r.folder.path / "config.yaml", cfg.dump())
    log.info("Resolved config (also in config.yaml):\n" + cfg.dump().rstrip())
    params = sum(p.numel() for p in r.ctx.model.parameters())
    world, batch, accum = r.dist_info.world_size, cfg.data.batch_size, cfg.optim.accum_steps
    peak_lr = r.ctx.schedule.peak_lr
    log.info(
        f"{cfg.model.name}/{cfg.model.norm}: {params / 1e6:.3f}M params | {world} process(es) on "
        f"{r.dist_info.device.type} | batch {batch}/process, {r.steps_per_epoch} steps/epoch | peak LR "
        f"{peak_lr:.4g} | amp {cfg.train.amp} | output {r.folder.path}"
    )
    recipe = cfg.dist.recipe_gpus
    if recipe is not None and recipe != world:
        log.warning(
            f"This recipe was written for {recipe} processes x {batch} images = {recipe * batch * accum} per step; "
            f"with {world} the global batch is {world * batch * accum} and the peak LR {peak_lr:.4g} "
            f"(linear scaling). Published numbers assume the recipe's global batch; to keep it, set "
            f"data.batch_size={recipe * batch // world} or optim.accum_steps."
        )


# ----------------------------------------------------------------------------------------------------
# The loop: epochs, then the steps of one epoch.
# ----------------------------------------------------------------------------------------------------


def fit(r: Run, pos: Position) -> int:
    """Trains to the end, or until preemption (exit 75) or a failure (exit 1); ``status.json`` says which."""
    r.folder.status("running", epoch=pos.epoch, output_dir=str(r.folder.path))
    try:
        return train_epochs(r, pos)
    except NonFiniteLossError as e:
        return failed(
            r,
            "non-finite loss",
            f"{e} The checkpoint on disk, {r.saver.describe_last()}, is the last good one (every save checks "
            f"the state first).",
        )
    except UnsafeStateError as e:
        return failed(r, "diverged", str(e))
    except CheckpointWriteError as e:
        return failed(r, "checkpoint not written", str(e))
    except BaseException as e:
        r.folder.status("failed", reason=type(e).__name__, message=str(e), output_dir=str(r.folder.path))
        raise


def failed(r: Run, reason: str, message: str) -> int:
    get_logger().error(message)
    r.folder.status("failed", reason=reason, message=message, output_dir=str(r.folder.path))
    return 1


def preempted(r: Run, epoch: int, step: int) -> int:
    get_logger().info(
        f"Stopped by {r.preempt.signal_name}: checkpoint written at epoch {epoch}, step {step}; exiting with status "
        f"{du.EXIT_PREEMPTED}. Run the same command to resume."
    )
    r.folder.status("preempted", epoch=epoch, step=step, output_dir=str(r.folder.path))
    return du.EXIT_PREEMPTED


def train_epochs(r: Run, pos: Position) -> int:
    """The epoch loop: train, evaluate, checkpoint, log; returns 0 at the end, 75 when stopped by a signal.

    An epoch's writes come in this order: last.pth (the commit point), best.pth, its log.jsonl line, and
    summary.json once the run ends; engine/run_folder.py repairs what a kill between them left undone.
    """
    cfg, folder, log = r.cfg, r.folder, get_logger()
    for epoch in range(pos.epoch, cfg.sched.epochs):
        t0 = time.perf_counter()
        metrics, stopped_at = train_one_epoch(r, epoch, pos)
        if stopped_at is not None:
            return preempted(r, epoch, stopped_at)
        record = end_of_epoch(r, metrics, epoch, pos)
        record["epoch_time"] = time.perf_counter() - t0
        pos.epoch, pos.step = epoch + 1, 0
        r.saver.save(epoch + 1, 0, pos, record=record)
        if r.dist_info.is_main:
            folder.log.write(record)
            faults.at("epoch:logged")
            r.tb.scalars({k: v for k, v in record.items() if k != "epoch"}, epoch + 1, "epoch/")
            r.tb.flush()
            log.info(epoch_line(cfg, record))
        if epoch + 1 < cfg.sched.epochs and r.preempt.should_stop(0, force_sync=True):
            return preempted(r, epoch + 1, 0)
    summary = folder.summarize(pos.best_top1, pos.best_epoch)
    faults.at("run:summary")
    last = summary["last_top1"] if summary["last_top1"] is not None else float("nan")
    log.info(f"Done. best top1 {pos.best_top1:.2f} (epoch {pos.best_epoch}), last top1 {last:.2f}")
    folder.status("completed", **summary)
    return 0


def train_one_epoch(r: Run, epoch: int, pos: Position) -> tuple[dict[str, float], int | None]:
    """Trains ``epoch`` from step ``pos.step`` on: the steps, their logging, timed checkpoints and preemption.

    Returns the epoch's averages, and the step at which a preemption signal stopped the epoch (its
    checkpoint written) or None when the epoch ran to its end.
    """
    cfg, ctx, steps = r.cfg, r.ctx, r.steps_per_epoch
    interval = cfg.log.interval
    if r.dist_info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(r.dist_info.device)
    progress = Progress(
        steps, f"epoch {epoch + 1}/{cfg.sched.epochs}", cfg.log.progress, interval, r.dist_info.is_main, pos.step
    )
    window = LossWindow(ctx.device)
    begin_epoch(ctx, pos.step)
    with epoch_batches(r.loaders.train, epoch, pos.step) as batches, contextlib.closing(progress):
        for step, (images, target) in enumerate(batches, start=pos.step + 1):  # step: steps done after this one
            out = train_step(ctx, images, target, step - 1)
            window.add(out["loss"])
            if step % interval == 0 or step == steps:
                check_finite(ctx, epoch, step)
                instant = {"loss": window.read(), "lr": ctx.optimizer.param_groups[0]["lr"]}
                r.tb.scalars(instant, ctx.global_update, "train/")
                progress.update(step, instant)
            else:
                progress.update(step)
            # Every dist.signal_check_every updates one all-reduce tells every rank whether any rank was
            # signalled (SIGTERM/SIGINT/SIGUSR1) and whether rank 0's clock calls for a timed checkpoint, so
            # all ranks stop or save at this same step (and the save holds every rank's RNG state).
            if out["updated"] and step < steps and r.preempt.is_check_step(ctx.global_update):
                stop, save = r.preempt.agree(save_due=r.saver.timed_save_due())
                if stop or save:
                    check_finite(ctx, epoch, step)  # never checkpoint weights that diverged (save checks more)
                    r.saver.save(epoch, step, pos)
                if stop:
                    return epoch_metrics(ctx), step
    return epoch_metrics(ctx), None


def end_of_epoch(r: Run, metrics: dict[str, float], epoch: int, pos: Position) -> dict:
    """Syncs statistics across ranks, evaluates (raw and EMA), updates the best top-1; returns the log record."""
    cfg, ctx, device = r.cfg, r.ctx, r.dist_info.device
    record = {"epoch": epoch + 1, **metrics}
    du.distribute_norm_stats(ctx.model, cfg.dist.dist_bn)
    if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.sched.epochs:
        probe = AttentionProbe(ctx.model) if (cfg.log.an_histograms and r.tb.writer is not None) else None
        val = evaluate(r.eval_model, r.loaders.val, device, ctx.amp, cfg.train.val_steps, probe and probe.arm)
        if probe is not None:
            probe.log(r.tb, epoch + 1)
        record.update({f"val_{k}": v for k, v in val.items()})
        if ctx.ema is not None:
            ema_val = evaluate(ctx.ema.module, r.loaders.val, device, ctx.amp, cfg.train.val_steps)
            record.update({f"ema_{k}": v for k, v in ema_val.items()})
        if val["top1"] > pos.best_top1:
            pos.best_top1, pos.best_epoch = val["top1"], epoch + 1
    if r.dist_info.distributed:
        record["ranks_consistent"] = du.ranks_consistent(ctx.model)
        if not record["ranks_consistent"]:
            get_logger().error("The ranks hold different weights after this epoch: the replicas diverged.")
    record.update(best_top1=pos.best_top1, best_epoch=pos.best_epoch, peak_memory_mb=peak_memory_mb(device))
    return record


def epoch_line(cfg: Config, r: dict) -> str:
    val = f"top1 {r['val_top1']:.2f}  top5 {r['val_top5']:.2f}  " if "val_top1" in r else ""
    return (
        f"epoch {r['epoch']}/{cfg.sched.epochs}  loss {r['train_loss']:.4f}  {val}"
        f"best {r['best_top1']:.2f} (epoch {r['best_epoch']})  {r['images_per_sec']:.0f} img/s"
    )


if __name__ == "__main__":
    sys.exit(main_guard(main))
