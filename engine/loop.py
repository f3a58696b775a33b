"""The training step and the evaluation loop.

:func:`train_step` trains on one batch and returns a dict (no callbacks): the AMP, DDP, accumulation,
clipping and EMA decisions are all visible there, in order. The epoch loop around it, with logging,
timed checkpoints and preemption checks, is ``train.py``'s ``train_one_epoch``. :func:`evaluate`
returns exact top-1/top-5 over every validation image, counted across ranks.
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
from engine.logs import get_logger
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
    """What the training step needs, and the state it advances; built by ``engine.build.build_train_context``."""

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
    loss_peak: torch.Tensor | None = None  # device: largest loss since the last checkpoint (engine/health.py)
    step_end: float = 0.0  # perf_counter() when the previous step ended: the wait for the next batch is data time

    def sync_meters(self) -> dict[str, float]:
        """Copies the device loss accumulator into ``meters`` (one sync) and returns them."""
        if self.loss_sum is not None:
            self.meters["loss_sum"] = float(self.loss_sum.item())
        return self.meters


def begin_epoch(ctx: TrainContext, start_step: int) -> None:
    """Readies ``ctx`` for an epoch that starts at ``start_step``.

    The epoch's running sums restart at step 0 and are kept when resuming mid-epoch (they came from the
    checkpoint), so a resumed epoch logs what an unbroken one would.
    """
    ctx.forward_model.train()
    if start_step == 0 or not ctx.meters:
        ctx.meters = {"loss_sum": 0.0, "steps": 0.0, "images": 0.0, "data_time": 0.0, "time": 0.0}
    if ctx.nonfinite is None:
        ctx.nonfinite = torch.zeros((), dtype=torch.bool, device=ctx.device)
    ctx.loss_sum = torch.tensor(ctx.meters["loss_sum"], dtype=torch.float64, device=ctx.device)
    if ctx.loss_peak is None:
        ctx.loss_peak = torch.zeros((), dtype=torch.float32, device=ctx.device)
    ctx.step_end = time.perf_counter()


def train_step(ctx: TrainContext, images: torch.Tensor, target: torch.Tensor, step: int) -> dict[str, Any]:
    """Trains on one batch; the optimizer steps after every ``ctx.accum_steps``-th batch.

    Call :func:`begin_epoch` at the start of each epoch first (it readies the running sums this step adds to).

    Args:
        step: index of this batch in the epoch (an epoch is a whole number of accumulation rounds).

    Returns:
        ``loss`` (a detached device tensor: reading it syncs), ``updated`` (True when the optimizer
        stepped) and ``images`` (the batch size).
    """
    t_start = time.perf_counter()
    ctx.meters["data_time"] += t_start - ctx.step_end
    model = ctx.forward_model
    update = (step + 1) % ctx.accum_steps == 0
    if ctx.mixup_fn is not None:
        images, target = ctx.mixup_fn(images, target)
    # Gradients of the micro-batches before the last are only accumulated locally: no DDP all-reduce.
    skip_sync = not update and hasattr(model, "no_sync")  # DDP, also behind torch.compile's wrapper
    with model.no_sync() if skip_sync else contextlib.nullcontext():
        with autocast(ctx.device, ctx.amp):
            logits = model(images)
        loss = ctx.loss_fn(logits.float(), target)
        scaled = loss / ctx.accum_steps if ctx.accum_steps > 1 else loss
        if ctx.scaler is not None:
            ctx.scaler.scale(scaled).backward()
        else:
            scaled.backward()
    loss = loss.detach()
    ctx.nonfinite |= ~torch.isfinite(loss)
    ctx.loss_sum += loss
    torch.maximum(ctx.loss_peak, loss.float(), out=ctx.loss_peak)  # NaN propagates
    if update:
        optimizer_step(ctx)
    ctx.meters["steps"] += 1
    ctx.meters["images"] += images.shape[0]
    ctx.step_end = time.perf_counter()
    ctx.meters["time"] += ctx.step_end - t_start
    return {"loss": loss, "updated": update, "images": images.shape[0]}


def optimizer_step(ctx: TrainContext) -> None:
    """LR of the schedule for this update, unscale and clip, step, zero the gradients, EMA, count the update."""
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


def check_finite(ctx: TrainContext, epoch: int, step: int) -> None:
    """Raises NonFiniteLossError on every rank if any rank saw a non-finite loss (collective, one device sync)."""
    if ctx.nonfinite is None:
        return
    flag = du.all_reduce_max(ctx.nonfinite.detach().float().clone())
    if flag.item() > 0:
        lr = ctx.optimizer.param_groups[0]["lr"]
        raise NonFiniteLossError(
            f"The training loss became non-finite (NaN or inf) in epoch {epoch}, before step {step} (LR {lr:.4g}). "
            f"The run stopped without saving. Try a lower optim.lr or a longer sched.warmup_epochs, train.amp=bf16 "
            f"instead of fp16, or optim.clip_grad (e.g. 5.0); then resume from the last checkpoint."
        )


class LossWindow:
    """Mean training loss over the steps since the last :meth:`read` (summed on the device: reading syncs once)."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), device=device)
        self.count = 0

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss
        self.count += 1

    def read(self) -> float:
        mean = float(self.total.item()) / max(self.count, 1)
        self.total.zero_()
        self.count = 0
        return mean


def epoch_metrics(ctx: TrainContext) -> dict[str, float]:
    """The epoch's averages so far (syncs the device loss sum)."""
    m = ctx.sync_meters()
    steps = max(m["steps"], 1.0)
    total = m["time"] + m["data_time"]
    return {
        "train_loss": m["loss_sum"] / steps,
        "lr": ctx.optimizer.param_groups[0]["lr"],
        "images_per_sec": m["images"] / total if total > 0 else 0.0,
        "compute_images_per_sec": m["images"] / m["time"] if m["time"] > 0 else 0.0,
        "data_time": m["data_time"],
    }


@contextlib.contextmanager
def epoch_batches(train_loader, epoch: int, start_step: int = 0):
    """The batches ``start_step ..`` of ``epoch``; the loader's iterator is closed however the epoch ends."""
    batches = train_loader.epoch(epoch, start_step=start_step)
    try:
        yield batches
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


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
    return _accuracy(stats, getattr(loader, "total_samples", None) if finished else None)


def _accuracy(stats: torch.Tensor, expected: int | None) -> dict[str, float]:
    """The summed counts of :func:`evaluate` as percentages, checked against the dataset size ``expected``."""
    correct1, correct5, count, loss_sum, skipped = stats.tolist()
    count, skipped = round(count), round(skipped)
    if expected is not None and count + skipped != expected:
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
