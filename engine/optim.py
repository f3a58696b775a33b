"""Optimizers, the learning-rate schedule, and the model EMA.

The schedule is a pure function of the optimizer step (:func:`lr_at`), so resuming anywhere, even in
the middle of an epoch, gives exactly the LR an uninterrupted run would have used, and the schedule
can be unit-tested at known steps. The recipe of the paper (docs/AN.md section 4): peak LR = ``lr`` x global
batch / 256, linear warm-up over 5 epochs stepped per iteration, then cosine to ``min_lr`` (0).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

import an
from engine.config import ConfigError


@dataclass(frozen=True)
class Schedule:
    """Everything :func:`lr_at` needs, in optimizer steps."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    warmup_start_factor: float = 0.0
    min_lr: float = 0.0
    name: str = "cosine"


def lr_at(step: int, s: Schedule) -> float:
    """The learning rate to use for optimizer step ``step`` (0-based), as the official recipe computes it.

    The official schedule evaluates step ``step`` at the end of that step, ``t = step + 1`` steps into the run
    (docs/AN.md 4.1), so the very first step already trains. With ``W = warmup_steps``, ``T = total_steps``
    and ``f = warmup_start_factor``:

    - warm-up, ``step < W``: ``peak * (f + (1 - f) * t / W)``; the first step gets ``peak * (f + (1 - f) / W)``
      and the last warm-up step ``W - 1`` gets ``peak`` (``f = 0`` is the official ``peak * t / W``);
    - then cosine: ``min_lr + (peak - min_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2``, clamped at
      ``min_lr`` from the last step ``T - 1`` on; ``constant`` holds ``peak`` after warm-up.
    """
    t = step + 1
    if s.warmup_steps > 0 and step < s.warmup_steps:
        return s.peak_lr * (s.warmup_start_factor + (1.0 - s.warmup_start_factor) * t / s.warmup_steps)
    if s.name == "constant":
        return s.peak_lr
    decay_steps = max(1, s.total_steps - s.warmup_steps)
    progress = min(1.0, (t - s.warmup_steps) / decay_steps)
    return s.min_lr + 0.5 * (s.peak_lr - s.min_lr) * (1.0 + math.cos(math.pi * progress))


def scaled_lr(base_lr: float, global_batch: int, base_batch_size: int = 256) -> float:
    """The linear scaling rule: ``base_lr`` is the LR for ``base_batch_size`` images."""
    return base_lr * global_batch / base_batch_size


def make_schedule(cfg, steps_per_epoch: int, world_size: int) -> Schedule:
    """Builds the schedule from the optim/sched config sections (steps = optimizer steps).

    ``steps_per_epoch`` counts batches (``data.steps_per_epoch``: whole accumulation rounds).
    """
    updates_per_epoch = max(1, steps_per_epoch // cfg.optim.accum_steps)
    global_batch = cfg.data.batch_size * world_size * cfg.optim.accum_steps
    return Schedule(
        peak_lr=scaled_lr(cfg.optim.lr, global_batch, cfg.optim.base_batch_size),
        total_steps=cfg.sched.epochs * updates_per_epoch,
        warmup_steps=round(cfg.sched.warmup_epochs * updates_per_epoch),
        warmup_start_factor=cfg.sched.warmup_start_factor,
        min_lr=cfg.sched.min_lr,
        name=cfg.sched.name,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class ApexMissingError(ConfigError):
    """optim.name asks for an apex optimizer but apex is not installed."""


def _apex_optimizer(name: str):
    try:
        if name == "apex_sgd":
            from apex.optimizers import FusedSGD as cls  # type: ignore[import-not-found]
        else:
            from apex.optimizers import FusedLAMB as cls  # type: ignore[import-not-found]
    except ImportError:
        raise ApexMissingError(
            f"optim.name='{name}' needs NVIDIA apex, which is not installed (the PyPI package 'apex' is an "
            f"unrelated project). Build apex from https://github.com/NVIDIA/apex with its CUDA extensions, or use "
            f"optim.name=sgd: PyTorch's native SGD (foreach/fused kernels) does what FusedSGD did."
        ) from None
    return cls


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.Optimizer:
    """The optimizer over the named parameter groups of ``an.param_groups`` (the weight-decay policy)."""
    o = cfg.optim
    groups = an.param_groups(model, o.weight_decay, decay_norm=o.decay_norm)  # only non-empty groups
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    cls = _apex_optimizer(o.name)
    if o.name == "apex_sgd":
        return cls(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    return cls(groups, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


class ModelEma(nn.Module):
    """An exponential moving average of a model's weights, kept in float32 on the model's device.

    ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step; buffers (running
    statistics) are copied. The effective decay is warmed up as ``min(decay, (1 + n) / (10 + n))`` over
    the first updates so that early EMA weights are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = int(self.num_updates)
        decay = min(self.decay, (1.0 + n) / (10.0 + n))
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for eb, b in zip(self.module.buffers(), model.buffers()):
            eb.copy_(b)
        self.num_updates += 1

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
