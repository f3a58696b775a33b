"""Builders: everything a run is made of, from its config (used by train.py, eval.py and tools).

Each function builds one thing and reads only the config sections it needs:

- :func:`build_model` (the model a config describes), :func:`build_model_for_training` (on its device,
  SyncBN-converted when asked, with its EMA);
- :func:`build_loaders` (this rank's loaders), :func:`check_num_classes`, :func:`check_dataset_classes`;
- :func:`build_train_context`: optimizer over the weight-decay groups, LR schedule, AMP scaler, DDP and
  torch.compile wrappers (:func:`wrap_model`), loss and mixup/cutmix (:func:`build_loss`);
- :func:`configure_torch` (seeds, determinism, math modes), :func:`expand_path`, :func:`memory_format_of`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import torch
from torch import nn

import an
import data
import models
from data.folder import class_difference
from engine import distributed as du
from engine.accel import compile_models
from engine.checkpoint import seed_everything
from engine.config import Config, ConfigError
from engine.init_weights import load_init_weights
from engine.logs import get_logger
from engine.loop import SoftTargetCrossEntropy, TrainContext, amp_dtype
from engine.optim import ModelEma, build_optimizer, make_schedule


def expand_path(text: str) -> str:
    """Expands ``~``, ``$VAR``/``${VAR}`` and ``${VAR:-default}`` in a path taken from a config."""

    def repl(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        return os.environ.get(name) or (default if default is not None else m.group(0))

    text = re.sub(r"\$\{(\w+)(:-([^}]*))?\}", repl, text)
    return os.path.expanduser(os.path.expandvars(text))


def memory_format_of(cfg: Config) -> torch.memory_format:
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


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


# ----------------------------------------------------------------------------------------------------
# Model.
# ----------------------------------------------------------------------------------------------------


def build_model(cfg: Config) -> nn.Module:
    """The model a config describes (on the CPU, freshly initialised): ``model.name``, ``model.norm``,
    ``model.num_classes`` and the model's options (the other keys of the ``model`` section)."""
    m = cfg.model
    return models.create_model(m.name, norm=m.norm, num_classes=m.num_classes, **m.options)


def build_model_for_training(
    cfg: Config, dist_info: du.DistInfo, init_from: str | None = None
) -> tuple[nn.Module, ModelEma | None]:
    """The raw model on its device and memory format (SyncBN-converted when asked), and its EMA.

    ``init_from``: a checkpoint whose weights start this (new) run (``train.init_from``; weights only).
    """
    model = build_model(cfg)
    if init_from:
        report = load_init_weights(model, expand_path(init_from))
        origin = report["official"] or {}
        get_logger().info(
            f"Initialised from {report['path']}: {report['tensors']} tensors of {report['source_model']}"
            + (f", official best top-1 {origin['best_prec1']:.2f}" if origin.get("best_prec1") is not None else "")
            + "; optimizer, schedule, EMA and epoch start fresh."
        )
    model = model.to(device=dist_info.device, memory_format=memory_format_of(cfg))
    if cfg.dist.sync_bn and dist_info.distributed:
        if dist_info.device.type != "cuda":
            get_logger().warning("dist.sync_bn needs CUDA (SyncBatchNorm); ignored on the CPU.")
        else:
            model = an.convert_sync_norm(model)
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema else None
    return model, ema


# ----------------------------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------------------------


def build_loaders(cfg: Config, dist_info: du.DistInfo, build_train: bool = True) -> data.Loaders:
    """The config's loaders for this rank, delivering batches on its device in the config's memory format."""
    return data.build_loaders(
        cfg,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        local_rank=dist_info.local_rank,
        device=dist_info.device,
        memory_format=memory_format_of(cfg),
        build_train=build_train,
    )


def check_num_classes(cfg: Config, loaders: data.Loaders) -> None:
    if loaders.num_classes != cfg.model.num_classes:
        raise ConfigError(
            f"The dataset at {cfg.data.root} has {loaders.num_classes} classes but model.num_classes is "
            f"{cfg.model.num_classes}; set model.num_classes={loaders.num_classes}."
        )


def check_dataset_classes(saved: list[str] | None, cfg: Config, loaders: data.Loaders, source) -> None:
    """Raises DatasetError when the dataset's classes are not those a checkpoint was trained on.

    ``saved``: the class folder names stored in the checkpoint (label order), or None (a checkpoint of synthetic
    data, an older one, or a converted official one): then only the number of classes is compared with the
    model's outputs (``model.num_classes``). Synthetic loaders (no class names) are not checked.
    """
    found = loaders.class_names
    if found is None:
        return
    root = cfg.data.root
    if saved is not None:
        if list(saved) == list(found):
            return
        only_data, only_ckpt = class_difference(found, saved)
        raise data.DatasetError(
            f"The dataset at {root} does not hold the classes {source} was trained on: it has {len(found)} class "
            f"folders, the checkpoint {len(saved)}. Only in the dataset: {only_data}; only in the checkpoint: "
            f"{only_ckpt}. Labels follow the sorted class folder names, so the accuracy would compare the "
            f"model's outputs with the wrong classes. Pass --data-root with the dataset the model was trained on "
            f"(or one with exactly its class folders)."
        )
    if len(found) != cfg.model.num_classes:
        raise data.DatasetError(
            f"The dataset at {root} has {len(found)} classes but the model of {source} has {cfg.model.num_classes} "
            f"outputs (model.num_classes), so its labels cannot be the model's. Pass --data-root with a dataset of "
            f"{cfg.model.num_classes} class folders, named so that they sort in the training order (ImageNet-1k: "
            f"the WordNet ids n01440764 ... n15075141)."
        )


# ----------------------------------------------------------------------------------------------------
# Training set-up.
# ----------------------------------------------------------------------------------------------------


def wrap_model(cfg: Config, dist_info: du.DistInfo, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(forward_model, eval_model)``: ``model`` wrapped in DDP (several processes) and torch.compile (if asked).

    The evaluation model is never DDP: ranks may evaluate different numbers of batches.
    """
    device = dist_info.device
    forward_model: nn.Module = model
    if dist_info.distributed:
        # Buffers (BN running statistics) are broadcast from rank 0 at every forward (DDP's default), so a
        # resumed run, which restores rank 0's buffers everywhere, continues exactly as an unbroken one.
        forward_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    eval_model: nn.Module = model
    forward_model, eval_model = compile_models(model, forward_model, cfg, dist_info.device)
    return forward_model, eval_model


def build_loss(cfg: Config) -> tuple[nn.Module, Callable | None]:
    """``(loss_fn, mixup_fn)``: soft-target cross-entropy behind timm's Mixup when mixup/cutmix is on."""
    t = cfg.train
    if t.mixup > 0 or t.cutmix > 0:
        from timm.data import Mixup

        mixup_fn = Mixup(
            mixup_alpha=t.mixup,
            cutmix_alpha=t.cutmix,
            prob=t.mixup_prob,
            switch_prob=t.mixup_switch_prob,
            label_smoothing=t.label_smoothing,
            num_classes=cfg.model.num_classes,
        )
        return SoftTargetCrossEntropy(), mixup_fn
    return nn.CrossEntropyLoss(label_smoothing=t.label_smoothing), None


def build_train_context(
    cfg: Config, dist_info: du.DistInfo, model: nn.Module, ema: ModelEma | None, steps_per_epoch: int
) -> tuple[TrainContext, nn.Module]:
    """Optimizer, schedule, AMP scaler, wrappers and loss: the training step's context, and the eval model."""
    device = dist_info.device
    schedule = make_schedule(cfg, steps_per_epoch, dist_info.world_size)
    dtype = amp_dtype(cfg.train.amp)
    forward_model, eval_model = wrap_model(cfg, dist_info, model)
    loss_fn, mixup_fn = build_loss(cfg)
    ctx = TrainContext(
        model=model,
        forward_model=forward_model,
        optimizer=build_optimizer(model, cfg, schedule.peak_lr),
        scaler=torch.amp.GradScaler(device.type) if dtype == torch.float16 else None,
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
