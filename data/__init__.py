"""Data loaders: one entry point, :func:`build_loaders`, for the torch, dali, dali_cpu and synthetic backends.

Every backend yields ``(images, labels)`` on the device: images float32, normalized with
``cfg.data.mean/std``, shape ``(B, 3, img_size, img_size)`` in the requested memory format; labels
int64. Sharding, reshuffling and augmentation seeds follow :mod:`data.sampling` in all backends.

Example::

    with data.build_loaders(cfg, rank=rank, world_size=world, local_rank=local_rank, device=device) as loaders:
        for epoch in range(epochs):
            for images, labels in loaders.train.epoch(epoch):
                ...
            for images, labels in loaders.val:
                ...
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from data.base import TrainLoader, ValLoader, eval_batch_size, make_normalizer
from data.folder import IMG_EXTENSIONS, DataLoadError, DatasetError, count_images, scan_dataset
from data.sampling import train_shard, train_steps, val_shard

__all__ = [
    "BACKENDS",
    "IMG_EXTENSIONS",
    "DataLoadError",
    "DatasetError",
    "Loaders",
    "TrainLoader",
    "ValLoader",
    "build_loaders",
    "count_train_images",
    "steps_per_epoch",
    "train_shard",
    "val_shard",
]

BACKENDS = ("torch", "dali", "dali_cpu", "synthetic")

log = logging.getLogger(__name__)


@dataclass
class Loaders:
    """What :func:`build_loaders` returns.

    Attributes:
        train: training loader (``None`` when not built).
        val: validation loader (``None`` when not built).
        steps_per_epoch: training steps per epoch per rank (0 when no training loader was built).
        num_classes: classes found on disk (folder backends) or ``cfg.model.num_classes`` (synthetic).
        class_names: sorted class folder names, or ``None`` for synthetic data.
    """

    train: TrainLoader | None
    val: ValLoader | None
    steps_per_epoch: int
    num_classes: int
    class_names: list[str] | None

    def close(self) -> None:
        """Releases the workers and pipelines of both loaders."""
        for loader in (self.train, self.val):
            if loader is not None:
                loader.close()

    def __enter__(self) -> Loaders:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def count_train_images(cfg: Any) -> int:
    """Training images that ``cfg`` would use (``synthetic_train_size`` for synthetic data)."""
    if cfg.data.backend == "synthetic":
        return cfg.data.synthetic_train_size
    return count_images(cfg.data.root, "train")


def steps_per_epoch(cfg: Any, num_train: int, world_size: int) -> int:
    """Training steps per epoch per rank of ``cfg`` on ``num_train`` images and ``world_size`` processes.

    The loaders, the schedule and ``train.py --dry-run`` all take the number from here: whole global
    batches, at most ``train.steps_per_epoch``, rounded down to whole optimizer steps of
    ``optim.accum_steps`` batches (:func:`data.sampling.train_steps`).
    """
    return train_steps(num_train, world_size, cfg.data.batch_size, cfg.train.steps_per_epoch, cfg.optim.accum_steps)


def _check_args(cfg: Any, rank: int, world_size: int) -> None:
    if cfg.data.backend not in BACKENDS:
        raise ValueError(f"Unknown data.backend '{cfg.data.backend}'; valid backends: {', '.join(BACKENDS)}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def _too_small(cfg: Any, n: int, world_size: int, where: str) -> DatasetError:
    batch, accum = cfg.data.batch_size, cfg.optim.accum_steps
    return DatasetError(
        f"The training set ({n} images, {where}) is smaller than one global batch ({batch} per process x "
        f"{world_size} processes x {accum} accumulation steps = {batch * world_size * accum}): no optimizer step "
        f"fits in an epoch. Lower data.batch_size or optim.accum_steps."
    )


def build_loaders(
    cfg: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    local_rank: int = 0,
    device: torch.device | str = "cpu",
    memory_format: torch.memory_format = torch.contiguous_format,
    build_train: bool = True,
    build_val: bool = True,
) -> Loaders:
    """Builds the training and validation loaders of one process.

    Args:
        cfg: the run's config; reads ``cfg.data.*``, ``cfg.train.seed``, ``cfg.train.steps_per_epoch``,
            ``cfg.optim.accum_steps`` and ``cfg.model.num_classes`` (synthetic data).
        rank: global rank (decides the shard).
        world_size: number of processes.
        local_rank: rank on this node (decides the GPU of a DALI pipeline when ``device`` has no index).
        device: where batches are delivered.
        memory_format: ``torch.contiguous_format`` (NCHW) or ``torch.channels_last``.
        build_train: build the training loader.
        build_val: build the validation loader.

    Raises:
        DatasetError: missing or malformed dataset folders (the message shows the expected layout).
        ImportError: a DALI backend was requested but DALI is not installed.
    """
    _check_args(cfg, rank, world_size)
    device = torch.device(device)
    d = cfg.data
    seed = cfg.train.seed
    normalizer = make_normalizer(d, device, memory_format)
    eval_batch = eval_batch_size(d)

    if d.backend == "synthetic":
        from data.synthetic import ImageBank, SyntheticTrainLoader, SyntheticValLoader

        num_classes = cfg.model.num_classes
        bank_size = min(d.synthetic_bank_size, max(d.synthetic_train_size, d.synthetic_val_size))
        bank = ImageBank(bank_size, d.img_size, num_classes, seed, device, normalizer)
        train = val = None
        steps = 0
        if build_train:
            steps = steps_per_epoch(cfg, d.synthetic_train_size, world_size)
            if steps == 0:
                raise _too_small(cfg, d.synthetic_train_size, world_size, "data.synthetic_train_size")
            train = SyntheticTrainLoader(
                bank,
                d.synthetic_train_size,
                batch_size=d.batch_size,
                seed=seed,
                rank=rank,
                world_size=world_size,
                steps=steps,
            )
        if build_val:
            val = SyntheticValLoader(
                bank, d.synthetic_val_size, batch_size=eval_batch, rank=rank, world_size=world_size
            )
        return Loaders(train, val, steps, num_classes, None)

    splits = scan_dataset(d.root, need_train=build_train, need_val=build_val)
    classes = next(iter(splits.values())).classes if splits else []
    if classes and len(classes) != cfg.model.num_classes:
        log.info("The dataset has %d classes (model.num_classes is %d).", len(classes), cfg.model.num_classes)
    steps = 0
    if build_train:
        n = splits["train"].num_samples
        steps = steps_per_epoch(cfg, n, world_size)
        if steps == 0:
            raise _too_small(cfg, n, world_size, str(splits["train"].folder))

    train: TrainLoader | None = None
    val: ValLoader | None = None
    try:
        if d.backend == "torch":
            from data.torch_loader import TorchTrainLoader, TorchValLoader

            if build_train:
                train = TorchTrainLoader(
                    splits["train"].files,
                    d,
                    seed=seed,
                    rank=rank,
                    world_size=world_size,
                    steps=steps,
                    normalizer=normalizer,
                )
            if build_val:
                val = TorchValLoader(splits["val"].files, d, rank=rank, world_size=world_size, normalizer=normalizer)
        else:
            from data.dali import DaliOutput, DaliTrainLoader, DaliValLoader

            gpu = d.backend == "dali"
            if gpu and device.type != "cuda":
                raise ValueError(
                    f"data.backend=dali decodes on the GPU but the device is '{device}'; use data.backend=dali_cpu "
                    f"(all DALI operators on the CPU) or data.backend=torch."
                )
            device_id = (device.index if device.index is not None else local_rank) if gpu else None
            output = DaliOutput(gpu, device_id, normalizer)
            if build_train:
                train = DaliTrainLoader(
                    splits["train"].files, d, seed=seed, rank=rank, world_size=world_size, steps=steps, output=output
                )
            if build_val:
                val = DaliValLoader(splits["val"].files, d, rank=rank, world_size=world_size, output=output)
    except BaseException:
        for loader in (train, val):
            if loader is not None:
                loader.close()
        raise
    return Loaders(train, val, steps, len(classes), classes)
