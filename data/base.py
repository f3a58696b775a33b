"""Loader interfaces shared by all backends, and the device feeder that overlaps copies with compute."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from data.sampling import split_batches, train_shard, val_shard
from data.transforms import Normalizer

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


def feed_device(
    batches: Iterable[Batch], convert: Callable[[torch.Tensor, torch.Tensor], Batch], device: torch.device
) -> Iterator[Batch]:
    """Applies ``convert`` (host batch -> device batch) to each batch, one batch ahead on a side stream on CUDA.

    On CUDA the copy and normalization of batch k+1 are queued on a side stream while the caller's
    work on batch k runs on the current stream; the current stream waits for the side stream before
    it uses a batch, and the tensors are marked as used by the current stream so that the caching
    allocator does not recycle them early. On other devices this is a plain map.
    """
    if device.type != "cuda":
        for images, labels in batches:
            yield convert(images, labels)
        return
    side = torch.cuda.Stream(device)
    pending: Batch | None = None
    for images, labels in batches:
        with torch.cuda.stream(side):
            ready = convert(images, labels)
        if pending is not None:
            yield pending
        current = torch.cuda.current_stream(device)
        current.wait_stream(side)
        for t in ready:
            t.record_stream(current)
        pending = ready
    if pending is not None:
        yield pending


class SkipLog:
    """Counts unreadable files and logs each one once (in the main process)."""

    def __init__(self, what: str):
        self.what = what
        self.files: dict[str, str] = {}
        self.events = 0

    def add(self, path: str, error: str, action: str) -> None:
        self.events += 1
        if path not in self.files:
            self.files[path] = error
            log.warning(
                "Skipped unreadable %s image %s (%s); %s. Run tools/check_dataset.py to list all such files.",
                self.what,
                path,
                error,
                action,
            )


class _Closable:
    """``close()`` plus context-manager support, for both loader kinds."""

    def close(self) -> None:
        """Releases worker processes or pipelines; the loader is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TrainLoader(_Closable):
    """Training batches of one rank. Subclasses implement :meth:`epoch`.

    Attributes:
        steps_per_epoch: batches per epoch (the same on every rank).
        batch_size: images per batch.
        num_samples: images in the whole training set.
        seed, rank, world_size: what the epoch's order and this rank's shard derive from.
    """

    steps_per_epoch: int
    batch_size: int
    num_samples: int
    seed: int
    rank: int
    world_size: int

    def __init__(self, num_samples: int, *, batch_size: int, seed: int, rank: int, world_size: int, steps: int):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = steps

    def batch_indices(self, epoch: int) -> np.ndarray:
        """Sample indices of this rank for ``epoch``, shaped ``(steps_per_epoch, batch_size)``."""
        return train_shard(
            self.num_samples, self.seed, epoch, self.rank, self.world_size, self.batch_size, self.steps_per_epoch
        )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Yields the batches ``start_step .. steps_per_epoch - 1`` of ``epoch`` as device tensors."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def skipped_files(self) -> int:
        """Distinct unreadable files met so far (replaced by other samples)."""
        return 0

    def _check_start(self, start_step: int) -> None:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")


class ValLoader(_Closable):
    """Validation batches of one rank: every image of this rank's shard once, the last batch partial.

    Attributes:
        indices: the samples of this rank (:func:`data.sampling.val_shard`).
        num_samples: images of this rank.
        total_samples: images in the whole validation set (all ranks).
        batch_size: images per full batch.
        rank: this process's rank.
    """

    indices: np.ndarray
    num_samples: int
    total_samples: int
    batch_size: int
    rank: int

    def __init__(self, total_samples: int, *, batch_size: int, rank: int, world_size: int):
        self.batch_size = batch_size
        self.rank = rank
        self.indices = val_shard(total_samples, rank, world_size)
        self.num_samples = len(self.indices)
        self.total_samples = total_samples

    def batches(self) -> list[np.ndarray]:
        """This rank's samples cut into batches of ``batch_size``; the last one may be smaller."""
        return split_batches(self.indices, self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    @property
    def skipped_files(self) -> int:
        """Distinct unreadable files met so far (dropped from their batch)."""
        return 0

    @property
    def last_pass_skipped(self) -> int:
        """Images of this rank dropped as unreadable during the last complete pass."""
        return 0


def eval_batch_size(data_cfg) -> int:
    """The per-process validation batch: ``data.eval_batch_size``, or ``data.batch_size`` when it is unset."""
    return data_cfg.eval_batch_size or data_cfg.batch_size


def make_normalizer(data_cfg, device: torch.device, memory_format: torch.memory_format) -> Normalizer:
    """The normalizer for ``cfg.data`` (mean/std) on ``device``."""
    return Normalizer(data_cfg.mean, data_cfg.std, device, memory_format)
