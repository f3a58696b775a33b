"""The training step loop and the evaluation loop.

``train_one_epoch`` runs one epoch (or its remainder after a resume) and returns averages;
``evaluate`` returns exact top-1/top-5 over every validation image, counted across ranks. The AMP,
DDP, accumulation, clipping and EMA decisions are all visible here, in order.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine import distributed as du
from engine.logging import Progress, get_logger
from engine.optim import ModelEma, Schedule, lr_at, set_lr


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy against soft targets (mixup/cutmix with label smoothing folded into the targets)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def amp_dtype(mode: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[mode]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class TrainContext:
    """What the step loop needs; built once by train.py."""

    model: nn.Module  # the raw module (weights, state dicts, EMA source)
    forward_model: nn.Module  # what runs the training forward: DDP and/or torch.compile wrapper of `model`
    optimizer: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler or None
    schedule: Schedule
    loss_fn: Callable
    device: torch.device
    amp: torch.dtype | None
    accum_steps: int = 1
    clip_grad: float | None = None
    ema: ModelEma | None = None
    mixup_fn: Callable | None = None
    global_update: int = 0  # optimizer steps done so far (the schedule's clock)
    nonfinite: torch.Tensor | None = None  # device flag: set when any loss was not finite
    meters: dict[str, float] = field(default_factory=dict)  # running sums of the current epoch (resumable)
    loss_sum: torch.Tensor | None = None  # device accumulator of this epoch's loss (synced into meters on demand)

    def sync_meters(self) -> dict[str, float]:
        """Copies the device loss accumulator into ``meters`` (one sync) and returns them."""
        if self.loss_sum is not None:
            self.meters["loss_sum"] = float(self.loss_sum.item())
        return self.meters


@dataclass
class EpochOutcome:
    metrics: dict[str, float]
    steps_done: int  # steps of this epoch done when the function returned
    stopped: bool  # True when preemption asked every rank to stop


def _new_meters() -> dict[str, float]:
    return {"loss_sum": 0.0, "steps": 0.0, "images": 0.0, "data_time": 0.0, "time": 0.0}


def check_finite(ctx: TrainContext, epoch: int, step: int) -> None:
    """Raises NonFiniteLossError on every rank if any rank saw a non-finite loss (one device sync)."""
    if ctx.nonfinite is None:
        return
    flag = du.all_reduce_max(ctx.nonfinite.detach().float().clone())
    if flag.item() > 0:
        lr = ctx.optimizer.param_groups[0]["lr"]
        raise NonFiniteLossError(
            f"The training loss became non-finite (NaN or inf) in epoch {epoch}, before step {step} (LR {lr:.4g}). "
            f"The run stopped without saving, so the last checkpoint on disk is still the last good one. Try a "
            f"lower optim.lr or a longer sched.warmup_epochs, train.amp=bf16 instead of fp16, or "
            f"optim.clip_grad (e.g. 5.0); then resume from the last checkpoint."
        )


def train_one_epoch(
    ctx: TrainContext,
    train_loader,
    epoch: int,
    steps_per_epoch: int,
    start_step: int = 0,
    *,
    should_stop: Callable[[int], bool] = lambda update: False,
    on_update: Callable[[int], None] = lambda step: None,
    progress: Progress | None = None,
    log_interval: int = 50,
    on_log: Callable[[dict[str, float], int], None] | None = None,
) -> EpochOutcome:
    """Trains from ``start_step`` to ``steps_per_epoch`` of ``epoch``.

    Args:
        should_stop: called after each optimizer step with the update count; True stops the epoch at
            this step boundary (preemption), with ``stopped=True`` in the outcome.
        on_update: called after each optimizer step with the number of steps done in this epoch
            (timed checkpoints hook in here).
        on_log: called every ``log_interval`` steps with instantaneous metrics and the global update.
    """
    model = ctx.forward_model
    model.train()
    if start_step == 0 or not ctx.meters:
        ctx.meters = _new_meters()
    if ctx.nonfinite is None:
        ctx.nonfinite = torch.zeros((), dtype=torch.bool, device=ctx.device)
    ctx.loss_sum = torch.tensor(ctx.meters["loss_sum"], dtype=torch.float64, device=ctx.device)
    accum = ctx.accum_steps
    is_ddp = hasattr(model, "no_sync")  # DDP, also behind torch.compile's wrapper
    step = start_step
    t_last = time.perf_counter()
    window_loss, window_steps = torch.zeros((), device=ctx.device), 0

    batches = train_loader.epoch(epoch, start_step=start_step)
    try:
        for images, target in batches:
            t_data = time.perf_counter()
            ctx.meters["data_time"] += t_data - t_last
            micro = step % accum
            last_micro = micro == accum - 1
            if ctx.mixup_fn is not None:
                images, target = ctx.mixup_fn(images, target)
            sync_ctx = model.no_sync() if (is_ddp and not last_micro) else contextlib.nullcontext()
            with sync_ctx:
                with autocast(ctx.device, ctx.amp):
                    logits = model(images)
                loss = ctx.loss_fn(logits.float(), target)
                scaled = loss / accum if accum > 1 else loss
                if ctx.scaler is not None:
                    ctx.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            loss_d = loss.detach()
            ctx.nonfinite |= ~torch.isfinite(loss_d)
            ctx.loss_sum += loss_d
            window_loss += loss_d
            window_steps += 1

            if last_micro:
                set_lr(ctx.optimizer, lr_at(ctx.global_update, ctx.schedule))
                if ctx.clip_grad is not None:
                    if ctx.scaler is not None:
                        ctx.scaler.unscale_(ctx.optimizer)
                    torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), ctx.clip_grad)
                if ctx.scaler is not None:
                    ctx.scaler.step(ctx.optimizer)
                    ctx.scaler.update()
                else:
                    ctx.optimizer.step()
                ctx.optimizer.zero_grad(set_to_none=True)
                if ctx.ema is not None:
                    ctx.ema.update(ctx.model)
                ctx.global_update += 1

            step += 1
            ctx.meters["steps"] += 1
            ctx.meters["images"] += images.shape[0]
            t_last = time.perf_counter()
            ctx.meters["time"] += t_last - t_data

            if step % log_interval == 0 or step == steps_per_epoch:
                check_finite(ctx, epoch, step)
                inst = {
                    "loss": float(window_loss.item()) / max(window_steps, 1),
                    "lr": ctx.optimizer.param_groups[0]["lr"],
                }
                window_loss.zero_()
                window_steps = 0
                if on_log is not None:
                    on_log(inst, ctx.global_update)
                if progress is not None:
                    progress.update(step, inst)
            elif progress is not None:
                progress.update(step)

            if last_micro:
                on_update(step)
                if step < steps_per_epoch and should_stop(ctx.global_update):
                    check_finite(ctx, epoch, step)
                    ctx.sync_meters()
                    return EpochOutcome(_epoch_metrics(ctx), step, stopped=True)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    check_finite(ctx, epoch, step)
    ctx.sync_meters()
    return EpochOutcome(_epoch_metrics(ctx), step, stopped=False)


def _epoch_metrics(ctx: TrainContext) -> dict[str, float]:
    m = ctx.meters
    steps = max(m["steps"], 1.0)
    total = m["time"] + m["data_time"]
    return {
        "train_loss": m["loss_sum"] / steps,
        "lr": ctx.optimizer.param_groups[0]["lr"],
        "images_per_sec": m["images"] / total if total > 0 else 0.0,
        "compute_images_per_sec": m["images"] / m["time"] if m["time"] > 0 else 0.0,
        "data_time": m["data_time"],
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    amp: torch.dtype | None = None,
    max_steps: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean loss over the whole validation set, counted exactly across ranks.

    Every rank evaluates its own shard (no padding, no duplicates); correct and total counts are
    summed over ranks, so the result does not depend on the number of GPUs. ``model`` must be the raw
    module (not DDP: ranks may run different numbers of batches). Raises if the global count differs
    from the dataset size (unless ``max_steps`` caps the pass).
    """
    was_training = model.training
    model.eval()
    # correct@1, correct@5, count, loss sum, unreadable images dropped by the loader
    stats = torch.zeros(5, dtype=torch.float64, device=device)
    finished = True
    for i, (images, target) in enumerate(loader):
        if max_steps is not None and i >= max_steps:
            finished = False
            break
        if on_batch is not None:
            on_batch(i)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk == target[:, None]
        stats[0] += hit[:, 0].sum()
        stats[1] += hit.any(dim=1).sum()
        stats[2] += target.shape[0]
        stats[3] += F.cross_entropy(logits, target, reduction="sum").double()
    if finished:
        stats[4] = getattr(loader, "last_pass_skipped", 0)
    du.all_reduce_sum(stats)
    model.train(was_training)
    correct1, correct5, count, loss_sum, skipped = stats.tolist()
    count, skipped = round(count), round(skipped)
    expected = getattr(loader, "total_samples", None)
    if finished and expected is not None and count + skipped != expected:
        raise RuntimeError(
            f"Validation counted {count} images across ranks (and {skipped} unreadable ones skipped) but the "
            f"validation set has {expected}: the loader duplicated or dropped images. This is a bug; please "
            f"report it with your launch command."
        )
    if skipped:
        get_logger().warning(
            f"Validation skipped {skipped} unreadable image(s): top-1/top-5 are over the {count} readable ones. "
            f"Run tools/check_dataset.py on the dataset to list and fix them."
        )
    if count == 0:
        get_logger().warning("Validation saw no images.")
        return {"top1": math.nan, "top5": math.nan, "loss": math.nan, "count": 0, "skipped": skipped}
    return {
        "top1": 100.0 * correct1 / count,
        "top5": 100.0 * correct5 / count,
        "loss": loss_sum / count,
        "count": count,
        "skipped": skipped,
    }
