"""The ``dali`` and ``dali_cpu`` backends: NVIDIA DALI pipelines over our own per-epoch file lists.

Sharding is not left to DALI's reader: each epoch, the rank's file list is computed by
:mod:`data.sampling` (the same permutation and strided shard as the other backends) and handed to
``fn.readers.file(files=..., labels=...)`` in order, without DALI shuffling or sharding. A pipeline is
built per epoch (train) and per pass (val) and dropped at its end, so no reader position leaks from
one epoch, pass or interrupted loop into the next. Resuming at ``start_step`` starts the list at that
batch (the same images as the uninterrupted run; DALI's augmentation stream restarts, so the crops differ).

Validation reads the rank's strided shard with ``pad_last_batch=True``; the padded copies of the last
image in the last batch are cut off before the batch is returned, so every image counts exactly once.

Pipeline: ``dali`` decodes on the GPU ("mixed": nvJPEG with the hardware decoder taking
``dali_hw_decoder_load`` of the JPEGs, and preallocated decoder memory), with a fused decode +
random-resized crop (ROI decode) for training; resize, flip and normalization (crop_mirror_normalize)
run on the GPU and the output is float32 already in the requested memory format. ``dali_cpu`` runs
the same operators on the CPU and returns uint8 NHWC; normalization then happens on the device
(:class:`data.transforms.Normalizer`), which moves 4x fewer bytes to the GPU than float32 would.

Evaluation resizes to the sizes that :func:`data.transforms.eval_transform` computes (shorter side
``round(img_size / crop_pct)``, longer side rounded half up) with antialiasing, and crops at the
same offset, so ``dali_cpu`` and ``torch`` agree to within resampling differences (tested). EXIF
orientation is ignored, as PIL does.

A decode failure raises :class:`data.folder.DataLoadError` naming the unreadable file (the files of
the failing batch are re-checked with PIL) and pointing to ``tools/check_dataset.py``.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from data.base import Batch, TrainLoader, ValLoader, feed_device
from data.folder import DataLoadError, FileTable
from data.sampling import dali_seed, val_shard
from data.transforms import Normalizer, describe_error, eval_resize_size, load_rgb

INSTALL_HINT = (
    "NVIDIA DALI is not installed, but data.backend={backend} needs it. Install the CUDA 13 build with\n"
    "  pip install nvidia-dali-cuda130\n"
    "(see https://docs.nvidia.com/deeplearning/dali/user-guide/docs/installation.html), "
    "or use data.backend=torch (PIL decoding in worker processes; no extra dependency)."
)


def import_dali(backend: str = "dali") -> types.SimpleNamespace:
    """Imports DALI on first use; raises ImportError with install instructions if it is missing."""
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as dtypes
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError as e:
        raise ImportError(INSTALL_HINT.format(backend=backend)) from e
    return types.SimpleNamespace(fn=fn, math=dmath, types=dtypes, Pipeline=Pipeline, feed_ndarray=feed_ndarray)


def build_pipeline(
    files: list[str],
    labels: list[int],
    *,
    train: bool,
    data_cfg: Any,
    batch_size: int,
    gpu: bool,
    device_id: int | None,
    seed: int,
    normalize: bool,
    channels_last: bool = False,
    prefetch: int | None = None,
):
    """Builds a DALI pipeline that reads ``files`` in order, once per epoch of the reader.

    Args:
        files: image paths in reading order.
        labels: class index per file.
        train: random-resized crop + flip (else resize + center crop).
        data_cfg: ``cfg.data``.
        batch_size: pipeline batch size.
        gpu: decode with the "mixed" (GPU) decoder and run the image operators on the GPU.
        device_id: CUDA device (``None`` for a CPU-only pipeline).
        seed: pipeline seed.
        normalize: output normalized float32 (CHW, or HWC when ``channels_last``); else uint8 HWC.
        channels_last: with ``normalize``, emit HWC so that the NCHW view is channels_last.
        prefetch: prefetch queue depth (default ``data_cfg.dali_prefetch``).
    """
    dali = import_dali("dali" if gpu else "dali_cpu")
    fn, dt = dali.fn, dali.types
    size = data_cfg.img_size
    interp = dt.INTERP_CUBIC if data_cfg.interpolation == "bicubic" else dt.INTERP_LINEAR
    decode: dict[str, Any] = {"device": "mixed" if gpu else "cpu", "output_type": dt.RGB, "adjust_orientation": False}
    if gpu:
        decode["hw_decoder_load"] = data_cfg.dali_hw_decoder_load
        if data_cfg.dali_preallocate:
            decode.update(
                preallocate_width_hint=data_cfg.dali_preallocate_width,
                preallocate_height_hint=data_cfg.dali_preallocate_height,
                device_memory_padding=data_cfg.dali_device_memory_padding,
                host_memory_padding=data_cfg.dali_host_memory_padding,
            )
    pipe = dali.Pipeline(
        batch_size=batch_size,
        num_threads=max(1, data_cfg.workers),
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=prefetch or data_cfg.dali_prefetch,
    )
    with pipe:
        encoded, label = fn.readers.file(
            files=files, labels=labels, random_shuffle=False, pad_last_batch=True, name="Reader"
        )
        if train:
            images = fn.decoders.image_random_crop(
                encoded,
                random_area=list(data_cfg.scale),
                random_aspect_ratio=list(data_cfg.ratio),
                num_attempts=10,
                **decode,
            )
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=interp, antialias=True)
            mirror = fn.random.coin_flip(probability=data_cfg.hflip)
        else:
            # Output size computed like data.transforms.eval_transform: shorter side -> `short`, other side
            # rounded half up (DALI's own resize_shorter keeps the scale uniform and shifts the sampling grid).
            shape = fn.peek_image_shape(encoded, dtype=dt.FLOAT, adjust_orientation=False)
            height, width = shape[0], shape[1]
            short = float(eval_resize_size(size, data_cfg.crop_pct))
            scale = short / dali.math.min(height, width)
            if gpu:
                decode["jpeg_fancy_upsampling"] = True  # chroma upsampling as libjpeg-turbo (PIL, DALI CPU) does it
            images = fn.decoders.image(encoded, **decode)
            images = fn.resize(
                images,
                resize_x=dali.math.floor(width * scale + 0.5),
                resize_y=dali.math.floor(height * scale + 0.5),
                interp_type=interp,
                antialias=True,
            )
            mirror = 0
        if normalize:
            images = fn.crop_mirror_normalize(
                images,
                dtype=dt.FLOAT,
                output_layout="HWC" if channels_last else "CHW",
                crop=(size, size),
                mean=[255.0 * m for m in data_cfg.mean],
                std=[255.0 * s for s in data_cfg.std],
                mirror=mirror,
            )
        else:
            images = fn.crop_mirror_normalize(
                images, dtype=dt.UINT8, output_layout="HWC", crop=(size, size), mirror=mirror
            )
        pipe.set_outputs(images, label)
    pipe.build()
    return pipe


def _find_unreadable(paths: list[str]) -> list[tuple[str, str]]:
    bad = []
    for path in dict.fromkeys(paths):
        try:
            load_rgb(path)
        except Exception as e:
            bad.append((path, describe_error(e)))
    return bad


class _DaliRunner:
    """What the DALI train and val loaders share: pipeline options, output conversion and error reports."""

    def __init__(
        self,
        files: FileTable,
        data_cfg: Any,
        *,
        gpu: bool,
        device: torch.device,
        device_id: int | None,
        normalizer: Normalizer,
        normalize_in_pipeline: bool | None,
    ):
        import_dali("dali" if gpu else "dali_cpu")
        self.files = files
        self.data_cfg = data_cfg
        self.gpu = gpu
        self.device = device
        self.device_id = device_id
        self.normalizer = normalizer
        self.normalize = gpu if normalize_in_pipeline is None else normalize_in_pipeline
        self.channels_last = normalizer.memory_format == torch.channels_last
        self._feed = import_dali().feed_ndarray

    def pipeline(self, indices: np.ndarray, batch_size: int, train: bool, seed: int):
        batches = -(-len(indices) // batch_size)
        return build_pipeline(
            self.files.paths(indices),
            self.files.labels[indices].tolist(),
            train=train,
            data_cfg=self.data_cfg,
            batch_size=batch_size,
            gpu=self.gpu,
            device_id=self.device_id,
            seed=seed,
            normalize=self.normalize,
            channels_last=self.channels_last,
            prefetch=min(self.data_cfg.dali_prefetch, batches),
        )

    def _to_torch(self, tensor_list, dtype: torch.dtype, on_device: bool) -> torch.Tensor:
        dense = tensor_list.as_tensor()
        if on_device:
            out = torch.empty(dense.shape(), dtype=dtype, device=self.device)
            self._feed(dense, out, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            pin = self.device.type == "cuda"
            out = torch.empty(dense.shape(), dtype=dtype, pin_memory=pin)
            self._feed(dense, out)
        return out

    def run(self, pipe, indices: np.ndarray, batch_size: int, what: str) -> Iterator[Batch]:
        """Runs ``pipe`` over ``indices`` (its file list) and yields the batches, the padding cut off.

        Iterations are scheduled one by one (``schedule_run``) and never past the last needed batch, so
        no prefetched batch of the reader's next epoch is decoded for nothing.
        """
        n = len(indices)
        batches = -(-n // batch_size)
        scheduled = 0
        for k in range(batches):
            try:
                if k == 0:
                    pipe.schedule_run()  # fills the prefetch queue: prefetch_queue_depth iterations
                    scheduled = pipe.prefetch_queue_depth
                images, labels = pipe.share_outputs()
            except RuntimeError as e:
                raise self._decode_error(e, indices, k, batch_size, what) from None
            real = min(batch_size, n - k * batch_size)
            x = self._to_torch(images, torch.float32 if self.normalize else torch.uint8, self.gpu)[:real]
            y = self._to_torch(labels, torch.int32, False).view(-1)[:real]
            del images, labels
            pipe.release_outputs()
            if scheduled < batches:
                pipe.schedule_run()
                scheduled += 1
            if self.normalize:
                if self.channels_last:
                    x = x.permute(0, 3, 1, 2)
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True).long()
            else:
                yield x, y

    def batches(self, pipe, indices: np.ndarray, batch_size: int, what: str) -> Iterator[Batch]:
        """Device batches of ``pipe`` in the requested memory format."""
        host = self.run(pipe, indices, batch_size, what)
        if self.normalize:
            for x, y in host:
                yield self.normalizer.format(x), y
        else:
            yield from feed_device(host, self.normalizer, self.device)

    def _decode_error(
        self, err: RuntimeError, indices: np.ndarray, k: int, batch_size: int, what: str
    ) -> DataLoadError:
        # The failing iteration may be any of those DALI had already queued (prefetch).
        ahead = self.data_cfg.dali_prefetch
        candidates = self.files.paths(indices[k * batch_size : (k + ahead + 1) * batch_size])
        bad = _find_unreadable(candidates)
        detail = str(err).strip().splitlines()
        dali_says = next((line for line in reversed(detail) if line.strip() and "no longer valid" not in line), "")
        if bad:
            names = "\n".join(f"  {p} ({e})" for p, e in bad)
            head = f"DALI could not decode an image in {what}, batch {k}. Unreadable files there:\n{names}\n"
        else:
            head = (
                f"The DALI pipeline failed in {what}, batch {k} (files {candidates[0]} ... {candidates[-1]}); "
                f"PIL can read all of those files, so the failure is DALI-specific.\n"
            )
        return DataLoadError(
            f"{head}DALI said: {dali_says}\nRun `python tools/check_dataset.py {os.path.dirname(self.files.root)}` "
            f"to list every unreadable file, then fix or remove them; data.backend=torch skips unreadable files."
        )


class DaliTrainLoader(TrainLoader):
    """Training loader of the ``dali`` / ``dali_cpu`` backends (see the module docstring)."""

    def __init__(
        self,
        files: FileTable,
        data_cfg: Any,
        *,
        seed: int,
        rank: int,
        world_size: int,
        steps: int,
        device: torch.device,
        gpu: bool,
        device_id: int | None,
        normalizer: Normalizer,
        normalize_in_pipeline: bool | None = None,
    ):
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batch_size = data_cfg.batch_size
        self.steps_per_epoch = steps
        self.num_samples = len(files)
        self._runner = _DaliRunner(
            files,
            data_cfg,
            gpu=gpu,
            device=device,
            device_id=device_id,
            normalizer=normalizer,
            normalize_in_pipeline=normalize_in_pipeline,
        )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        self._check_start(start_step)
        indices = self.batch_indices(epoch)[start_step:].reshape(-1)
        if not len(indices):
            return
        pipe = self._runner.pipeline(indices, self.batch_size, True, dali_seed(self.seed, self.rank, epoch))
        try:
            yield from self._runner.batches(pipe, indices, self.batch_size, f"epoch {epoch} (rank {self.rank})")
        finally:
            del pipe


class DaliValLoader(ValLoader):
    """Validation loader of the ``dali`` / ``dali_cpu`` backends (see the module docstring)."""

    def __init__(
        self,
        files: FileTable,
        data_cfg: Any,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        gpu: bool,
        device_id: int | None,
        normalizer: Normalizer,
        normalize_in_pipeline: bool | None = None,
    ):
        self.rank = rank
        self.batch_size = data_cfg.eval_batch_size or data_cfg.batch_size
        self.indices = val_shard(len(files), rank, world_size)
        self.num_samples = len(self.indices)
        self.total_samples = len(files)
        self._runner = _DaliRunner(
            files,
            data_cfg,
            gpu=gpu,
            device=device,
            device_id=device_id,
            normalizer=normalizer,
            normalize_in_pipeline=normalize_in_pipeline,
        )

    def __iter__(self) -> Iterator[Batch]:
        if not self.num_samples:
            return
        pipe = self._runner.pipeline(self.indices, self.batch_size, False, 0)
        try:
            yield from self._runner.batches(pipe, self.indices, self.batch_size, f"validation (rank {self.rank})")
        finally:
            del pipe
