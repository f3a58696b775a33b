"""The ``synthetic`` backend: a fixed bank of random images on the device, for benchmarks and tests.

Sample ``i`` is bank entry ``i % M`` with label ``(i % M) % num_classes``; the bank is drawn once from
the run seed (on the CPU, so it is the same on every device) and moved to the device. Each entry is
half noise and half a per-class color, so a tiny model can fit it. Sharding, reshuffling and resuming
follow :mod:`data.sampling` exactly like the folder backends; per step the only host work is a small
index array, so it costs next to nothing next to a training step.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from data.base import Batch, TrainLoader, ValLoader
from data.sampling import mix_seed
from data.transforms import Normalizer

_BANK_TAG = 0x5EED_0004


class ImageBank:
    """``size`` random uint8 NHWC images and their labels, on ``device``.

    Args:
        size: number of distinct images.
        img_size: height and width.
        num_classes: labels are ``entry % num_classes``.
        seed: run seed.
        device: where the bank lives.
        normalizer: turns gathered uint8 batches into normalized float batches.
    """

    def __init__(
        self, size: int, img_size: int, num_classes: int, seed: int, device: torch.device, normalizer: Normalizer
    ):
        g = torch.Generator().manual_seed(mix_seed(_BANK_TAG, seed) & ((1 << 63) - 1))
        noise = torch.randint(0, 256, (size, img_size, img_size, 3), dtype=torch.uint8, generator=g)
        colors = torch.randint(0, 256, (num_classes, 3), dtype=torch.uint8, generator=g)
        labels = torch.arange(size) % num_classes
        images = noise // 2 + colors[labels].view(size, 1, 1, 3) // 2
        self.size = size
        self.device = device
        self.images = images.to(device)
        self.labels = labels.to(device)
        self._normalizer = normalizer

    def batch(self, indices: np.ndarray) -> Batch:
        """The normalized batch of sample ``indices`` (any integers; taken modulo the bank size)."""
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64) % self.size).to(self.device, non_blocking=True)
        return self._normalizer(self.images.index_select(0, idx), self.labels.index_select(0, idx))


class SyntheticTrainLoader(TrainLoader):
    """Training batches from an :class:`ImageBank`, sharded and reshuffled like real data."""

    def __init__(
        self, bank: ImageBank, num_samples: int, *, batch_size: int, seed: int, rank: int, world_size: int, steps: int
    ):
        super().__init__(num_samples, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, steps=steps)
        self.bank = bank

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        self._check_start(start_step)
        shard = self.batch_indices(epoch)
        for step in range(start_step, self.steps_per_epoch):
            yield self.bank.batch(shard[step])


class SyntheticValLoader(ValLoader):
    """Validation batches from an :class:`ImageBank`: samples ``rank, rank + W, ...``, no padding."""

    def __init__(self, bank: ImageBank, total_samples: int, *, batch_size: int, rank: int, world_size: int):
        super().__init__(total_samples, batch_size=batch_size, rank=rank, world_size=world_size)
        self.bank = bank

    def __iter__(self) -> Iterator[Batch]:
        for indices in self.batches():
            yield self.bank.batch(indices)
