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
from pathlib import Path

import numpy as np
import torch
from torch import nn

import an
import data
import models
from engine import checkpoint as ck
from engine import distributed as du
from engine.config import Config, ConfigError, load_config, validate_names
from engine.logging import JsonlWriter, Progress, TensorBoard, setup_logging
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


def model_kwargs(cfg: Config) -> dict:
    m = cfg.model
    kwargs = dict(
        norm_k=m.norm_k,
        an_placement=m.an_placement,
        an_attention=m.an_attention if m.an_attention != "hsigmoid" else None,
        an_impl=m.an_impl if m.an_impl != "auto" else None,
        gn_groups=m.gn_groups if m.gn_groups != 32 else None,
        zero_init_last=m.zero_init_last,
        deep_stem=m.deep_stem,
        avg_down=m.avg_down,
        drop_rate=m.drop_rate,
    )
    kwargs.update(m.kwargs)
    return kwargs


def build_model(cfg: Config) -> nn.Module:
    """The model a config describes (also used by eval.py and tools)."""
    return models.create_model(
        cfg.model.name, norm=cfg.model.norm, num_classes=cfg.model.num_classes, **model_kwargs(cfg)
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


def make_checkpoint(cfg: Config, ctx: TrainContext, epoch: int, step_in_epoch: int, best: dict, rng: list) -> dict:
    return {
        "model": ctx.model.state_dict(),
        "ema": ctx.ema.state_dict() if ctx.ema is not None else None,
        "optimizer": ctx.optimizer.state_dict(),
        "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "global_update": ctx.global_update,
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
        "meters": dict(ctx.sync_meters()) if step_in_epoch else {},
        "rng": rng,
        "config": cfg.to_dict(),
        "git_rev": ck.git_revision(),
        "versions": ck.versions(),
    }


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
        validate_names(cfg, source)
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


def run(cfg: Config, args, dist_info: du.DistInfo) -> int:
    device = dist_info.device
    folder = RunFolder(cfg.train.output_dir, dist_info.is_main)
    log = setup_logging(dist_info.rank, folder.path if dist_info.is_main else None)
    seed_everything(cfg.train.seed + dist_info.rank)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # Where do we start? Decide before building anything heavy, so that a wrong folder fails fast.
    resume_path = Path(args.resume) if args.resume else (folder.last if cfg.train.auto_resume else None)
    if resume_path is not None and not args.resume and not resume_path.exists():
        resume_path = None
    if resume_path is None and folder.last.exists():
        raise SystemExit(
            f"{folder.last} exists but train.auto_resume is false: refusing to overwrite an earlier run. Pass "
            f"--resume {folder.last}, set train.auto_resume=true, or choose another train.output_dir."
        )
    saved = None
    if resume_path is not None:
        saved = ck.load_checkpoint(resume_path, map_location="cpu")
        check_same_experiment(saved, cfg, resume_path)

    # Model.
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = build_model(cfg).to(device=device, memory_format=memory_format)
    if cfg.dist.sync_bn and dist_info.distributed:
        if device.type != "cuda":
            log.warning("dist.sync_bn needs CUDA (SyncBatchNorm); ignored on the CPU.")
        else:
            model = an.convert_sync_norm(model)
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema else None

    # Data.
    loaders = data.build_loaders(
        cfg,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        local_rank=dist_info.local_rank,
        device=device,
        memory_format=memory_format,
    )
    if loaders.num_classes != cfg.model.num_classes:
        raise ConfigError(
            f"The dataset at {cfg.data.root} has {loaders.num_classes} classes but model.num_classes is "
            f"{cfg.model.num_classes}; set model.num_classes={loaders.num_classes}."
        )
    steps_per_epoch = loaders.steps_per_epoch
    accum = cfg.optim.accum_steps
    steps_per_epoch -= steps_per_epoch % accum  # an epoch ends on an optimizer step
    if steps_per_epoch == 0:
        raise ConfigError(
            f"Not a single training step fits in an epoch: the training set is smaller than one global batch "
            f"({cfg.data.batch_size} per process x {dist_info.world_size} processes x {accum} accumulation steps). "
            f"Lower data.batch_size."
        )

    # Optimization.
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
    eval_model: nn.Module = model
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
        accum_steps=accum,
        clip_grad=cfg.optim.clip_grad,
        ema=ema,
        mixup_fn=mixup_fn,
        memory_format=memory_format,
    )

    # Resume.
    start_epoch, start_step = 0, 0
    best = {"top1": -1.0, "epoch": -1}
    if saved is not None:
        ck.load_model_state(model, saved["model"], resume_path)
        if ema is not None:
            if saved.get("ema") is not None:
                ema.load_state_dict(saved["ema"])
            else:
                log.warning(f"{resume_path} has no EMA weights; the EMA restarts from the current weights.")
        optimizer.load_state_dict(saved["optimizer"])
        if scaler is not None and saved.get("scaler") is not None:
            scaler.load_state_dict(saved["scaler"])
        start_epoch, start_step = saved["epoch"], saved["step_in_epoch"]
        ctx.global_update = saved["global_update"]
        ctx.meters = dict(saved.get("meters") or {})
        best = {"top1": saved["best_top1"], "epoch": saved["best_epoch"]}
        rng = saved.get("rng") or []
        if len(rng) == dist_info.world_size:
            ck.restore_rng(rng[dist_info.rank])
        else:
            seed_everything(cfg.train.seed + dist_info.rank + 1000 * ctx.global_update)
            log.warning(f"Resuming with {dist_info.world_size} processes instead of {len(rng)}: RNG streams reseeded.")
        if start_step >= steps_per_epoch:
            start_epoch, start_step = start_epoch + 1, 0
        log.info(f"Resumed from {resume_path}: epoch {start_epoch}, step {start_step}, update {ctx.global_update}.")
        if dist_info.is_main:
            folder.log.truncate_after(start_epoch)

    if dist_info.is_main:
        (folder.path / "config.yaml").write_text(cfg.dump())
        params = sum(p.numel() for p in model.parameters())
        log.info(
            f"{cfg.model.name}/{cfg.model.norm}: {params / 1e6:.3f}M params | {dist_info.world_size} process(es) on "
            f"{device.type} | batch {cfg.data.batch_size}/process, {steps_per_epoch} steps/epoch | peak LR "
            f"{schedule.peak_lr:.4g} | amp {cfg.train.amp} | output {folder.path}"
        )
        recipe = cfg.dist.recipe_gpus
        if recipe is not None and recipe != dist_info.world_size:
            log.warning(
                f"This recipe was written for {recipe} processes x {cfg.data.batch_size} images = "
                f"{recipe * cfg.data.batch_size * accum} per step; with {dist_info.world_size} the global batch is "
                f"{dist_info.world_size * cfg.data.batch_size * accum} and the peak LR {schedule.peak_lr:.4g} (linear "
                f"scaling). Published numbers assume the recipe's global batch; to keep it, set "
                f"data.batch_size={recipe * cfg.data.batch_size // dist_info.world_size} or optim.accum_steps."
            )
    tb = TensorBoard(folder.path / "tb", enabled=cfg.log.tensorboard and dist_info.is_main)
    preempt = du.PreemptionHandler(device, cfg.dist.signal_check_every)
    last_save = {"time": time.monotonic()}

    def save(epoch: int, step_in_epoch: int, top1_improved: bool = False) -> None:
        rng = gather_rng(dist_info)
        if dist_info.is_main:
            ck.save_atomic(make_checkpoint(cfg, ctx, epoch, step_in_epoch, best, rng), folder.last)
            if top1_improved:
                ck.copy_atomic(folder.last, folder.best)
            if step_in_epoch == 0 and cfg.train.save_every and epoch % cfg.train.save_every == 0:
                ck.copy_atomic(folder.last, folder.path / f"epoch_{epoch:03d}.pth")
        last_save["time"] = time.monotonic()
        du.barrier()

    def timed_save(epoch: int):
        def on_update(step: int) -> None:
            if cfg.train.save_minutes <= 0 or not dist_info.is_main:
                return
            if time.monotonic() - last_save["time"] < cfg.train.save_minutes * 60:
                return
            # Rank 0 alone decides and writes (no collective), after checking that nothing diverged.
            if bool(ctx.nonfinite) or not all(torch.isfinite(p).all() for p in model.parameters()):
                return
            ck.save_atomic(make_checkpoint(cfg, ctx, epoch, step, best, [ck.capture_rng()]), folder.last)
            last_save["time"] = time.monotonic()

        return on_update

    status_info = {"epoch": start_epoch, "output_dir": str(folder.path)}
    folder.status("running", **status_info)
    exit_code = 0
    try:
        with preempt:
            for epoch in range(start_epoch, cfg.sched.epochs):
                t0 = time.perf_counter()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                progress = Progress(
                    steps_per_epoch,
                    f"epoch {epoch + 1}/{cfg.sched.epochs}",
                    cfg.log.progress,
                    cfg.log.interval,
                    enabled=dist_info.is_main,
                    first_step=start_step,
                )
                outcome = train_one_epoch(
                    ctx,
                    loaders.train,
                    epoch,
                    steps_per_epoch,
                    start_step,
                    should_stop=preempt.should_stop,
                    on_update=timed_save(epoch),
                    progress=progress,
                    log_interval=cfg.log.interval,
                    on_log=lambda m, step: tb.scalars(m, step, "train/"),
                )
                progress.close()
                start_step = 0
                if outcome.stopped:
                    save(epoch, outcome.steps_done)
                    log.info(f"Preempted: checkpoint written at epoch {epoch}, step {outcome.steps_done}; exiting.")
                    folder.status("preempted", epoch=epoch, step=outcome.steps_done, output_dir=str(folder.path))
                    return du.EXIT_PREEMPTED

                record = {"epoch": epoch + 1, **outcome.metrics}
                du.distribute_norm_stats(model, cfg.dist.dist_bn)
                is_last = epoch + 1 == cfg.sched.epochs
                improved = False
                if (epoch + 1) % cfg.train.eval_every == 0 or is_last:
                    probe = AttentionProbe(model) if (cfg.log.an_histograms and tb.writer is not None) else None
                    val = evaluate(eval_model, loaders.val, device, dtype, cfg.train.val_steps, probe and probe.arm)
                    if probe is not None:
                        probe.log(tb, epoch + 1)
                    record.update({f"val_{k}": v for k, v in val.items()})
                    if ema is not None:
                        ema_val = evaluate(ema.module, loaders.val, device, dtype, cfg.train.val_steps)
                        record.update({f"ema_{k}": v for k, v in ema_val.items()})
                    improved = val["top1"] > best["top1"]
                    if improved:
                        best = {"top1": val["top1"], "epoch": epoch + 1}
                if dist_info.distributed:
                    record["ranks_consistent"] = du.ranks_consistent(model)
                    if not record["ranks_consistent"]:
                        log.error("The ranks hold different weights after this epoch: the replicas diverged.")
                record.update(
                    best_top1=best["top1"],
                    best_epoch=best["epoch"],
                    peak_memory_mb=peak_memory_mb(device),
                    epoch_time=time.perf_counter() - t0,
                )
                save(epoch + 1, 0, top1_improved=improved)
                if dist_info.is_main:
                    folder.log.write(record)
                    tb.scalars({k: v for k, v in record.items() if k != "epoch"}, epoch + 1, "epoch/")
                    tb.flush()
                    log.info(
                        f"epoch {epoch + 1}/{cfg.sched.epochs}  loss {record['train_loss']:.4f}  "
                        + (
                            f"top1 {record['val_top1']:.2f}  top5 {record['val_top5']:.2f}  "
                            if "val_top1" in record
                            else ""
                        )
                        + f"best {best['top1']:.2f} (epoch {best['epoch']})  {record['images_per_sec']:.0f} img/s"
                    )
                if not is_last and preempt.should_stop(0, force_sync=True):
                    log.info(f"Preempted at the end of epoch {epoch + 1}; checkpoint written; exiting.")
                    folder.status("preempted", epoch=epoch + 1, step=0, output_dir=str(folder.path))
                    return du.EXIT_PREEMPTED

        summary = summarize(folder, best)
        if dist_info.is_main:
            (folder.path / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            log.info(
                f"Done. best top1 {summary['best_top1']:.2f} (epoch {summary['best_epoch']}), last top1 "
                f"{summary['last_top1'] if summary['last_top1'] is not None else float('nan'):.2f}"
            )
        folder.status("completed", **summary)
    except NonFiniteLossError as e:
        log.error(str(e))
        folder.status("failed", reason="non-finite loss", message=str(e))
        exit_code = 1
    finally:
        tb.close()
        loaders.close()
    return exit_code


def summarize(folder: RunFolder, best: dict) -> dict:
    last = {}
    if folder.log.path.exists():
        lines = [json.loads(x) for x in folder.log.path.read_text().splitlines() if x.strip()]
        evaluated = [r for r in lines if r.get("val_top1") is not None]
        last = evaluated[-1] if evaluated else {}
    return {
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
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
