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
``last.pth``. SIGTERM/SIGUSR1 make every rank stop at the same step, checkpoint, and exit with status 75.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import an
import data
import models
from engine import checkpoint as ck
from engine import distributed as du
from engine.config import Config, ConfigError, load_config
from engine.logging import JsonlWriter, Progress, TensorBoard, get_logger, setup_logging
from engine.loop import NonFiniteLossError, SoftTargetCrossEntropy, TrainContext, amp_dtype, evaluate, train_one_epoch
from engine.optim import ModelEma, build_optimizer, make_schedule

EXIT_CONFIG_ERROR = 2
IMAGENET_TRAIN_IMAGES = 1_281_167


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, or a name in configs/ (e.g. resnet50_an.yaml)")
    parser.add_argument("--resume", default=None, help="checkpoint to resume from (default: OUTPUT_DIR/last.pth)")
    parser.add_argument("--dry-run", action="store_true", help="print model, batch, LR and steps, then exit")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=0.2")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# Set-up helpers.
# ----------------------------------------------------------------------------------------------------


def expand_path(text: str) -> str:
    """Expands ``~``, ``$VAR``/``${VAR}`` and ``${VAR:-default}`` in a path taken from a config."""

    def repl(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        return os.environ.get(name) or (default if default is not None else m.group(0))

    text = re.sub(r"\$\{(\w+)(:-([^}]*))?\}", repl, text)
    return os.path.expanduser(os.path.expandvars(text))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: Config) -> nn.Module:
    """The model a config describes (also used by eval.py and tools)."""
    m = cfg.model
    return models.create_model(m.name, norm=m.norm, num_classes=m.num_classes, **m.options)


def memory_format_of(cfg: Config) -> torch.memory_format:
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


def build_loaders(cfg: Config, dist_info: du.DistInfo, build_train: bool = True):
    """The config's loaders for this rank (also used by eval.py)."""
    return data.build_loaders(
        cfg,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        local_rank=dist_info.local_rank,
        device=dist_info.device,
        memory_format=memory_format_of(cfg),
        build_train=build_train,
    )


def check_recipe(cfg: Config, source: str) -> None:
    """Cross-key checks that a single key's type cannot express."""
    if (cfg.train.mixup > 0 or cfg.train.cutmix > 0) and cfg.data.batch_size % 2:
        raise ConfigError(
            f"'data.batch_size' is {cfg.data.batch_size} in {source}, but mixup/cutmix pair each image with "
            f"another of the batch and need an even per-GPU batch; use an even data.batch_size."
        )
    if cfg.train.amp == "fp16" and cfg.train.compile and not torch.cuda.is_available():
        raise ConfigError(f"train.amp=fp16 with train.compile needs CUDA ({source}); use train.amp=bf16 on the CPU.")


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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def an_attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The attention branches of the AN layers of ``model`` (name -> module whose output is lambda, N x K)."""
    return {name: m.attention for name, m in model.named_modules() if isinstance(m, an.AttentiveNorm2d)}


# ----------------------------------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------------------------------


def gather_rng(dist_info: du.DistInfo) -> list:
    """Every rank's RNG state, in rank order (collective: all ranks must call it)."""
    state = ck.capture_rng()
    if not du.is_initialized():
        return [state]
    states = [None] * dist_info.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def check_same_experiment(saved: dict, cfg: Config, path: Path) -> None:
    s = saved.get("config", {}).get("model", {})
    for key in ("name", "norm", "num_classes"):
        if key in s and s[key] != getattr(cfg.model, key):
            raise ck.CheckpointError(
                f"Cannot resume from {path}: it was trained with model.{key}={s[key]!r} but this config says "
                f"{getattr(cfg.model, key)!r}. Choose another train.output_dir for a new experiment, or pass "
                f"the original config."
            )


# ----------------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        source = str(args.config)
        check_recipe(cfg, source)
        cfg.data.root = expand_path(cfg.data.root)
    except ConfigError as e:
        print(f"Config error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.dry_run:
        return dry_run(cfg, args)
    dist_info = du.init_distributed(cfg.dist.backend, cfg.dist.timeout_minutes, device=args.device)
    try:
        return run(cfg, args, dist_info)
    finally:
        du.cleanup()


def dry_run(cfg: Config, args) -> int:
    """Resolves the config, builds the model and prints what a real run would do, without any data."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    macs = models.count_macs(model, cfg.data.img_size)
    try:
        n_train, counted = data.count_train_images(cfg), "counted"
    except data.DatasetError:
        n_train, counted = IMAGENET_TRAIN_IMAGES, f"assumed: ImageNet-1k, no dataset at '{cfg.data.root}'"
    steps = n_train // (cfg.data.batch_size * world)
    if cfg.train.steps_per_epoch is not None:
        steps = min(steps, cfg.train.steps_per_epoch)
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


def configure_torch(cfg: Config, rank: int) -> None:
    """Seeds, determinism and math-mode switches for this process."""
    seed_everything(cfg.train.seed + rank)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def find_resume(cfg: Config, args, folder: RunFolder) -> tuple[dict | None, Path | None]:
    """The checkpoint to resume from (``--resume``, else ``last.pth`` of the run folder), loaded and checked.

    Decided before anything heavy is built, so that a wrong folder fails fast; an existing run is never
    overwritten silently.
    """
    if args.resume:
        path = Path(args.resume)
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


def build_model_for_training(cfg: Config, dist_info: du.DistInfo, memory_format) -> tuple[nn.Module, ModelEma | None]:
    """The raw model on its device (SyncBN-converted when asked) and its EMA."""
    model = build_model(cfg).to(device=dist_info.device, memory_format=memory_format)
    if cfg.dist.sync_bn and dist_info.distributed:
        if dist_info.device.type != "cuda":
            get_logger().warning("dist.sync_bn needs CUDA (SyncBatchNorm); ignored on the CPU.")
        else:
            model = an.convert_sync_norm(model)
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema else None
    return model, ema


def usable_steps(cfg: Config, loaders, dist_info: du.DistInfo) -> int:
    """Training steps per epoch, checked against the dataset and rounded down to whole optimizer steps."""
    if loaders.num_classes != cfg.model.num_classes:
        raise ConfigError(
            f"The dataset at {cfg.data.root} has {loaders.num_classes} classes but model.num_classes is "
            f"{cfg.model.num_classes}; set model.num_classes={loaders.num_classes}."
        )
    accum = cfg.optim.accum_steps
    steps = loaders.steps_per_epoch - loaders.steps_per_epoch % accum  # an epoch ends on an optimizer step
    if steps == 0:
        raise ConfigError(
            f"Not a single training step fits in an epoch: the training set is smaller than one global batch "
            f"({cfg.data.batch_size} per process x {dist_info.world_size} processes x {accum} accumulation steps). "
            f"Lower data.batch_size."
        )
    return steps


def build_context(
    cfg: Config, dist_info: du.DistInfo, model: nn.Module, ema, steps_per_epoch: int
) -> tuple[TrainContext, nn.Module]:
    """Optimizer, schedule, AMP scaler, DDP/compile wrappers and loss: everything the step loop needs."""
    device = dist_info.device
    schedule = make_schedule(cfg, steps_per_epoch, dist_info.world_size)
    optimizer = build_optimizer(model, cfg, schedule.peak_lr)
    dtype = amp_dtype(cfg.train.amp)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    forward_model: nn.Module = model
    if dist_info.distributed:
        # Buffers (BN running statistics) are broadcast from rank 0 at every forward (DDP's default), so a
        # resumed run, which restores rank 0's buffers everywhere, continues exactly as an unbroken one.
        forward_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    eval_model: nn.Module = model  # never DDP: ranks may evaluate different numbers of batches
    if cfg.train.compile:
        forward_model = torch.compile(forward_model)
        eval_model = torch.compile(model)
    if cfg.train.mixup > 0 or cfg.train.cutmix > 0:
        from timm.data import Mixup

        mixup_fn = Mixup(
            mixup_alpha=cfg.train.mixup,
            cutmix_alpha=cfg.train.cutmix,
            prob=cfg.train.mixup_prob,
            switch_prob=cfg.train.mixup_switch_prob,
            label_smoothing=cfg.train.label_smoothing,
            num_classes=cfg.model.num_classes,
        )
        loss_fn = SoftTargetCrossEntropy()
    else:
        mixup_fn = None
        loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    ctx = TrainContext(
        model=model,
        forward_model=forward_model,
        optimizer=optimizer,
        scaler=scaler,
        schedule=schedule,
        loss_fn=loss_fn,
        device=device,
        amp=dtype,
        accum_steps=cfg.optim.accum_steps,
        clip_grad=cfg.optim.clip_grad,
        ema=ema,
        mixup_fn=mixup_fn,
    )
    return ctx, eval_model


@dataclass
class Position:
    """Where training stands: the next epoch and step to run, and the best validation top-1 so far."""

    epoch: int = 0
    step: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1


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
        seed_everything(cfg.train.seed + dist_info.rank + 1000 * ctx.global_update)
        log.warning(f"Resuming with {dist_info.world_size} processes instead of {len(rng)}: RNG streams reseeded.")
    if pos.step >= steps_per_epoch:
        pos.epoch, pos.step = pos.epoch + 1, 0
    log.info(f"Resumed from {path}: epoch {pos.epoch}, step {pos.step}, update {ctx.global_update}.")
    return pos


def announce(cfg: Config, dist_info: du.DistInfo, ctx: TrainContext, steps_per_epoch: int, folder: RunFolder) -> None:
    """Rank 0: saves the resolved config and logs the run's shape (and a recipe-size warning)."""
    log = get_logger()
    (folder.path / "config.yaml").write_text(cfg.dump())
    log.info("Resolved config (also in config.yaml):\n" + cfg.dump().rstrip())
    params = sum(p.numel() for p in ctx.model.parameters())
    world, batch, accum = dist_info.world_size, cfg.data.batch_size, cfg.optim.accum_steps
    log.info(
        f"{cfg.model.name}/{cfg.model.norm}: {params / 1e6:.3f}M params | {world} process(es) on "
        f"{dist_info.device.type} | batch {batch}/process, {steps_per_epoch} steps/epoch | peak LR "
        f"{ctx.schedule.peak_lr:.4g} | amp {cfg.train.amp} | output {folder.path}"
    )
    recipe = cfg.dist.recipe_gpus
    if recipe is not None and recipe != world:
        log.warning(
            f"This recipe was written for {recipe} processes x {batch} images = {recipe * batch * accum} per step; "
            f"with {world} the global batch is {world * batch * accum} and the peak LR {ctx.schedule.peak_lr:.4g} "
            f"(linear scaling). Published numbers assume the recipe's global batch; to keep it, set "
            f"data.batch_size={recipe * batch // world} or optim.accum_steps."
        )


class Checkpointer:
    """Writes a run's checkpoints: ``last.pth`` (atomically), ``best.pth`` and ``epoch_NNN.pth`` copies.

    :meth:`save` is collective (it gathers every rank's RNG state; rank 0 writes, then all ranks wait), so
    all ranks call it at the same step. :meth:`timed_hook` refreshes ``last.pth`` inside an epoch every
    ``train.save_minutes``: rank 0 alone decides and writes, so no rank waits for the clock of another.
    """

    def __init__(self, cfg: Config, folder: RunFolder, dist_info: du.DistInfo, ctx: TrainContext):
        self.cfg, self.folder, self.dist_info, self.ctx = cfg, folder, dist_info, ctx
        self.last_time = time.monotonic()
        # Provenance cannot change during a run: computed once, not at every save.
        self.provenance = {"config": cfg.to_dict(), "git_rev": ck.git_revision(), "versions": ck.versions()}

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

    def _write(self, epoch: int, step_in_epoch: int, pos: Position, rng: list) -> None:
        ck.save_atomic(self.state(epoch, step_in_epoch, pos, rng), self.folder.last)
        self.last_time = time.monotonic()

    def save(self, epoch: int, step_in_epoch: int, pos: Position, improved: bool = False) -> None:
        rng = gather_rng(self.dist_info)
        if self.dist_info.is_main:
            self._write(epoch, step_in_epoch, pos, rng)
            if improved:
                ck.copy_atomic(self.folder.last, self.folder.best)
            every = self.cfg.train.save_every
            if step_in_epoch == 0 and every and epoch % every == 0:
                ck.copy_atomic(self.folder.last, self.folder.path / f"epoch_{epoch:03d}.pth")
        du.barrier()

    def timed_hook(self, epoch: int, pos: Position) -> Callable[[int], None]:
        minutes = self.cfg.train.save_minutes

        def on_update(step: int) -> None:
            if minutes <= 0 or not self.dist_info.is_main or time.monotonic() - self.last_time < minutes * 60:
                return
            # Never write weights that diverged: check the loss flag and the parameters first.
            if bool(self.ctx.nonfinite) or not all(torch.isfinite(p).all() for p in self.ctx.model.parameters()):
                return
            self._write(epoch, step, pos, [ck.capture_rng()])

        return on_update


def run(cfg: Config, args, dist_info: du.DistInfo) -> int:
    folder = RunFolder(cfg.train.output_dir, dist_info.is_main)
    setup_logging(dist_info.rank, folder.path if dist_info.is_main else None)
    configure_torch(cfg, dist_info.rank)
    saved, resume_path = find_resume(cfg, args, folder)
    memory_format = memory_format_of(cfg)
    model, ema = build_model_for_training(cfg, dist_info, memory_format)
    loaders = build_loaders(cfg, dist_info)
    try:
        steps_per_epoch = usable_steps(cfg, loaders, dist_info)
        ctx, eval_model = build_context(cfg, dist_info, model, ema, steps_per_epoch)
        pos = Position()
        if saved is not None:
            pos = restore(saved, resume_path, cfg, ctx, dist_info, steps_per_epoch)
            if dist_info.is_main:
                folder.log.truncate_after(pos.epoch)
        if dist_info.is_main:
            announce(cfg, dist_info, ctx, steps_per_epoch, folder)
        return fit(cfg, dist_info, folder, ctx, loaders, eval_model, steps_per_epoch, pos)
    finally:
        loaders.close()


def fit(
    cfg: Config,
    dist_info: du.DistInfo,
    folder: RunFolder,
    ctx: TrainContext,
    loaders,
    eval_model: nn.Module,
    steps_per_epoch: int,
    pos: Position,
) -> int:
    """The epoch loop: train, evaluate, log, checkpoint; stops early on preemption or a non-finite loss."""
    log = get_logger()
    tb = TensorBoard(folder.path / "tb", enabled=cfg.log.tensorboard and dist_info.is_main)
    preempt = du.PreemptionHandler(dist_info.device, cfg.dist.signal_check_every)
    saver = Checkpointer(cfg, folder, dist_info, ctx)
    folder.status("running", epoch=pos.epoch, output_dir=str(folder.path))
    try:
        with preempt:
            for epoch in range(pos.epoch, cfg.sched.epochs):
                t0 = time.perf_counter()
                if dist_info.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dist_info.device)
                progress = Progress(
                    steps_per_epoch,
                    f"epoch {epoch + 1}/{cfg.sched.epochs}",
                    cfg.log.progress,
                    cfg.log.interval,
                    enabled=dist_info.is_main,
                    first_step=pos.step,
                )
                outcome = train_one_epoch(
                    ctx,
                    loaders.train,
                    epoch,
                    steps_per_epoch,
                    pos.step,
                    should_stop=preempt.should_stop,
                    on_update=saver.timed_hook(epoch, pos),
                    progress=progress,
                    log_interval=cfg.log.interval,
                    on_log=lambda m, step: tb.scalars(m, step, "train/"),
                )
                progress.close()
                pos.epoch, pos.step = epoch, 0
                if outcome.stopped:
                    saver.save(epoch, outcome.steps_done, pos)
                    log.info(f"Preempted: checkpoint written at epoch {epoch}, step {outcome.steps_done}; exiting.")
                    folder.status("preempted", epoch=epoch, step=outcome.steps_done, output_dir=str(folder.path))
                    return du.EXIT_PREEMPTED
                record = end_of_epoch(cfg, dist_info, ctx, loaders, eval_model, tb, outcome.metrics, epoch, pos)
                pos.epoch = epoch + 1
                saver.save(epoch + 1, 0, pos, improved=record["best_epoch"] == epoch + 1)
                if dist_info.is_main:
                    folder.log.write({**record, "epoch_time": time.perf_counter() - t0})
                    tb.scalars({k: v for k, v in record.items() if k != "epoch"}, epoch + 1, "epoch/")
                    tb.flush()
                    log.info(epoch_line(cfg, record))
                if epoch + 1 < cfg.sched.epochs and preempt.should_stop(0, force_sync=True):
                    log.info(f"Preempted at the end of epoch {epoch + 1}; checkpoint written; exiting.")
                    folder.status("preempted", epoch=epoch + 1, step=0, output_dir=str(folder.path))
                    return du.EXIT_PREEMPTED
        summary = summarize(folder, pos)
        if dist_info.is_main:
            (folder.path / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            last = summary["last_top1"] if summary["last_top1"] is not None else float("nan")
            log.info(f"Done. best top1 {pos.best_top1:.2f} (epoch {pos.best_epoch}), last top1 {last:.2f}")
        folder.status("completed", **summary)
        return 0
    except NonFiniteLossError as e:
        log.error(str(e))
        folder.status("failed", reason="non-finite loss", message=str(e))
        return 1
    finally:
        tb.close()


def end_of_epoch(cfg, dist_info, ctx, loaders, eval_model, tb, metrics, epoch: int, pos: Position) -> dict:
    """Syncs statistics across ranks, evaluates (raw and EMA), updates the best top-1; returns the log record."""
    device = dist_info.device
    record = {"epoch": epoch + 1, **metrics}
    du.distribute_norm_stats(ctx.model, cfg.dist.dist_bn)
    if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.sched.epochs:
        probe = AttentionProbe(ctx.model) if (cfg.log.an_histograms and tb.writer is not None) else None
        val = evaluate(eval_model, loaders.val, device, ctx.amp, cfg.train.val_steps, probe and probe.arm)
        if probe is not None:
            probe.log(tb, epoch + 1)
        record.update({f"val_{k}": v for k, v in val.items()})
        if ctx.ema is not None:
            ema_val = evaluate(ctx.ema.module, loaders.val, device, ctx.amp, cfg.train.val_steps)
            record.update({f"ema_{k}": v for k, v in ema_val.items()})
        if val["top1"] > pos.best_top1:
            pos.best_top1, pos.best_epoch = val["top1"], epoch + 1
    if dist_info.distributed:
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


def summarize(folder: RunFolder, pos: Position) -> dict:
    last = {}
    if folder.log.path.exists():
        lines = [json.loads(x) for x in folder.log.path.read_text().splitlines() if x.strip()]
        evaluated = [r for r in lines if r.get("val_top1") is not None]
        last = evaluated[-1] if evaluated else {}
    return {
        "best_top1": pos.best_top1,
        "best_epoch": pos.best_epoch,
        "last_top1": last.get("val_top1"),
        "last_top5": last.get("val_top5"),
        "last_epoch": last.get("epoch"),
        "ema_last_top1": last.get("ema_top1"),
    }


class AttentionProbe:
    """Captures AN attention weights (lambda) of the first validation batch for TensorBoard histograms."""

    def __init__(self, model: nn.Module):
        self.modules = an_attention_modules(model)
        self.values: dict[str, torch.Tensor] = {}
        self.handles = []

    def arm(self, batch_index: int) -> None:
        if batch_index == 0 and not self.handles:
            for name, module in self.modules.items():
                self.handles.append(module.register_forward_hook(self._hook(name)))
        elif batch_index == 1:
            self.remove()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.values[name] = output.detach().float().cpu()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def log(self, tb: TensorBoard, step: int) -> None:
        self.remove()
        for name, values in self.values.items():
            tb.histogram(f"an_attention/{name}", values, step)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, ck.CheckpointError, data.DatasetError) as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
