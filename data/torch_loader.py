"""The ``torch`` backend: PIL decoding in DataLoader worker processes, uint8 batches, normalization on the device.

Each DataLoader item is a whole batch: the sampler hands a worker ``(epoch, sample indices)`` and the
worker decodes, augments and stacks the images into one uint8 NHWC tensor (no float work and no
per-sample collate on the CPU). Augmentation draws from a generator seeded by ``(seed, epoch, index)``,
so batches are bitwise identical whatever the number of workers and wherever an epoch is resumed.

Unreadable files (corrupt, truncated, or not an image) never stop a run:

* training: the sample is replaced by the next readable sample in file order (``index + 1``, ``+ 2``,
  ... wrapping around), augmented with the original sample's seed, so the batch keeps its size and
  stays deterministic;
* validation: the sample is dropped from its batch (a duplicate would bias the accuracy), and
  :attr:`TorchValLoader.last_pass_skipped` says how many were dropped on this rank in the last pass.

Each bad file is logged once (python ``logging``, warning) by the main process, and counted
(``skipped_files``). The first bad file of a class makes the main process look for one readable image of
that class (:class:`ClassCheck`); when there is none, the class would silently drop out of training (or
of the validation counts), so the loader raises :class:`~data.folder.DataLoadError` naming the class folder.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import random
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from data.base import Batch, SkipLog, TrainLoader, ValLoader, eval_batch_size, feed_device
from data.folder import DataLoadError, FileTable
from data.sampling import augment_seed
from data.transforms import Normalizer, describe_error, eval_transform, load_rgb, train_transform

MAX_REPLACEMENTS = 64  # consecutive unreadable files tolerated before training gives up


class FolderBatches(Dataset):
    """Map-style dataset whose items are whole uint8 batches; the key is ``(epoch, sample indices)``.

    Args:
        files: the split's files and labels.
        train: training augmentation (else the eval transform).
        data_cfg: ``cfg.data`` (img_size, scale, ratio, hflip, interpolation, crop_pct).
        seed: run seed.
    """

    def __init__(self, files: FileTable, train: bool, data_cfg: Any, seed: int):
        self.files = files
        self.train = train
        self.seed = seed
        self.img_size = data_cfg.img_size
        self.scale = tuple(data_cfg.scale)
        self.ratio = tuple(data_cfg.ratio)
        self.hflip = data_cfg.hflip
        self.interpolation = data_cfg.interpolation
        self.crop_pct = data_cfg.crop_pct
        self._bad: dict[int, str] = {}  # per process: files known to be unreadable

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, index: int) -> Image.Image | None:
        if index in self._bad:
            return None
        try:
            return load_rgb(self.files.path(index))
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            self._bad[index] = describe_error(e)
            return None

    def __getitem__(self, key: tuple[int, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
        """The batch of ``key``: uint8 images, labels, and the ``(index, error)`` of each unreadable file met."""
        epoch, indices = key
        n = len(indices)
        s = self.img_size
        images = torch.empty((n, s, s, 3), dtype=torch.uint8)
        out = images.numpy()
        labels = torch.empty(n, dtype=torch.int64)
        skipped: list[tuple[int, str]] = []
        count = 0
        for index in indices:
            index = int(index)
            if self.train:
                img, label = self._train_sample(index, skipped)
                rng = random.Random(augment_seed(self.seed, epoch, index))
                out[count] = train_transform(img, rng, s, self.scale, self.ratio, self.hflip, self.interpolation)
            else:
                img = self._decode(index)
                if img is None:
                    skipped.append((index, self._bad[index]))
                    continue
                label = int(self.files.labels[index])
                out[count] = eval_transform(img, s, self.crop_pct, self.interpolation)
            labels[count] = label
            count += 1
        if count < n:
            images, labels = images[:count].clone(), labels[:count].clone()
        return images, labels, skipped

    def _train_sample(self, index: int, skipped: list[tuple[int, str]]) -> tuple[Image.Image, int]:
        n = len(self.files)
        for k in range(min(MAX_REPLACEMENTS, n)):
            j = (index + k) % n
            img = self._decode(j)
            if img is not None:
                return img, int(self.files.labels[j])
            skipped.append((j, self._bad[j]))
        raise DataLoadError(
            f"{min(MAX_REPLACEMENTS, n)} consecutive training files from {self.files.path(index)} on are unreadable "
            f"(last error: {skipped[-1][1]}). Run `python tools/check_dataset.py ROOT` to list the bad files."
        )


class ClassCheck:
    """Raises when every image of a class is unreadable, checked once per class at its first unreadable file.

    The torch loaders replace (training) or drop (validation) an unreadable file, which is right for a few bad
    files but would silently remove a whole class whose every file is bad. At the first bad file of a class, the
    main process decodes the class's files in order until one succeeds (usually the next one); when none does,
    :meth:`check` raises :class:`~data.folder.DataLoadError` naming the class folder and the fix.
    """

    def __init__(self, files: FileTable, split: str):
        self.files = files
        self.split = split
        self.cleared: set[int] = set()  # classes known to hold a readable image

    def check(self, index: int, error: str) -> None:
        label = int(self.files.labels[index])
        if label in self.cleared:
            return
        members = np.flatnonzero(self.files.labels == label)
        for i in members:
            if int(i) == index:
                continue
            try:
                load_rgb(self.files.path(int(i)))
            except Exception:  # PIL raises many types for bad files
                continue
            self.cleared.add(label)
            return
        folder = os.path.dirname(self.files.path(index))
        root = os.path.dirname(self.files.root)
        effect = (
            "training would go on without this class, and the model would never learn it"
            if self.split == "train"
            else "the evaluation would leave the whole class out of its counts"
        )
        raise DataLoadError(
            f"Every image of the class folder {folder} ({len(members)} files) is unreadable (e.g. {error}): {effect}. "
            f"Replace the images (python tools/check_dataset.py {root} lists every bad file), or remove the class "
            f"folder from both train/ and val/ and set model.num_classes to the new number of classes."
        )


class _Keys(Sampler):
    """The batch keys of the current pass; replaced before each ``iter(loader)``."""

    def __init__(self):
        self.keys: list[tuple[int, np.ndarray]] = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def _no_collate(item):
    return item


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """Linux: the kernel SIGKILLs this worker the moment the process that forked it dies (PR_SET_PDEATHSIG).

    Elsewhere, or when the worker was not forked by the trainer itself (a forkserver), torch's own
    watchdog ends it within seconds of the trainer's death.
    """
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid != os.getppid():
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent.pid:  # the trainer died before prctl took effect: no death signal will come
        os._exit(0)


def _worker_init(_worker_id: int) -> None:
    """Runs in each worker process before it loads anything.

    Launchers stop a job by signalling whole process groups (``timeout``, torchrun's shutdown, SLURM),
    which reaches the workers too. They ignore SIGTERM, SIGINT and SIGUSR1, so that the trainer can
    finish its step and write its checkpoint with its workers still serving it; they end with the trainer
    (:func:`_die_with_parent`, and the loader's shutdown).
    """
    torch.set_num_threads(1)  # PIL work; keep torch's intra-op pool from oversubscribing the cores
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()


def _make_loader(dataset: FolderBatches, keys: _Keys, data_cfg: Any, device: torch.device) -> DataLoader:
    workers = data_cfg.workers
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=keys,
        num_workers=workers,
        collate_fn=_no_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
        timeout=float(getattr(data_cfg, "loader_timeout", 0.0)) if workers > 0 else 0.0,
        worker_init_fn=_worker_init if workers > 0 else None,
    )


def _shutdown(loader: DataLoader | None) -> None:
    if loader is None:
        return
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    loader._iterator = None


class _TorchLoader:
    """What the two ``torch`` loaders share: the worker-process DataLoader, and the report of unreadable files."""

    files: FileTable
    _loader: DataLoader | None
    _skips: SkipLog
    _class_check: ClassCheck

    def _setup(self, files: FileTable, normalizer: Normalizer, split: str) -> None:
        """The state both loaders keep: their files, the device normalization, the keys the workers read and the
        report of unreadable files."""
        self.files = files
        self.device = normalizer.device
        self._normalizer = normalizer
        self._keys = _Keys()
        self._skips = SkipLog("training" if split == "train" else "validation")
        self._class_check = ClassCheck(files, split)

    @property
    def skipped_files(self) -> int:
        return len(self._skips.files)

    def _report_skipped(self, skipped: list[tuple[int, str]], action: str) -> None:
        """Logs (once per file) the unreadable files a worker met; checks their class at its first bad file."""
        for index, error in skipped:
            path = self.files.path(index)
            if path not in self._skips.files:
                self._class_check.check(index, error)
            self._skips.add(path, error, action)

    def close(self) -> None:
        _shutdown(self._loader)
        self._loader = None


class TorchTrainLoader(_TorchLoader, TrainLoader):
    """Training loader of the ``torch`` backend (see the module docstring)."""

    def __init__(
        self,
        files: FileTable,
        data_cfg: Any,
        *,
        seed: int,
        rank: int,
        world_size: int,
        steps: int,
        normalizer: Normalizer,
    ):
        super().__init__(
            len(files), batch_size=data_cfg.batch_size, seed=seed, rank=rank, world_size=world_size, steps=steps
        )
        self._setup(files, normalizer, "train")
        self._loader: DataLoader | None = _make_loader(
            FolderBatches(files, True, data_cfg, seed), self._keys, data_cfg, self.device
        )

    @property
    def skipped_file_names(self) -> list[str]:
        """The unreadable files met so far."""
        return sorted(self._skips.files)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        self._check_start(start_step)
        if self._loader is None:
            raise RuntimeError("the loader was closed")
        shard = self.batch_indices(epoch)
        self._keys.keys = [(epoch, shard[s]) for s in range(start_step, self.steps_per_epoch)]
        if not self._keys.keys:
            return
        yield from feed_device(self._host_batches(), self._normalizer, self.device)

    def _host_batches(self) -> Iterator[Batch]:
        for images, labels, skipped in self._loader:
            self._report_skipped(skipped, "replaced by the next readable image")
            yield images, labels


class TorchValLoader(_TorchLoader, ValLoader):
    """Validation loader of the ``torch`` backend (see the module docstring)."""

    def __init__(
        self,
        files: FileTable,
        data_cfg: Any,
        *,
        rank: int,
        world_size: int,
        normalizer: Normalizer,
    ):
        super().__init__(len(files), batch_size=eval_batch_size(data_cfg), rank=rank, world_size=world_size)
        self._setup(files, normalizer, "val")
        self._keys.keys = [(0, b) for b in self.batches()]
        self._last_pass_skipped = 0
        self._loader: DataLoader | None = None
        if self.num_samples:
            self._loader = _make_loader(FolderBatches(files, False, data_cfg, 0), self._keys, data_cfg, self.device)

    @property
    def last_pass_skipped(self) -> int:
        return self._last_pass_skipped

    def __iter__(self) -> Iterator[Batch]:
        if not self.num_samples:
            return
        if self._loader is None:
            raise RuntimeError("the loader was closed")
        yield from feed_device(self._host_batches(), self._normalizer, self.device)

    def _host_batches(self) -> Iterator[Batch]:
        dropped = 0
        for images, labels, skipped in self._loader:
            self._report_skipped(skipped, "left out of the validation counts")
            dropped += len(skipped)
            if len(labels):
                yield images, labels
        self._last_pass_skipped = dropped
