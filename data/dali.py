"""The ``dali`` and ``dali_cpu`` backends: one NVIDIA DALI pipeline per split for the whole run, fed our own order.

Each loader builds its pipeline once (at construction; :func:`build_pipeline`) and runs it for every epoch or
validation pass, resetting it in between. The samples are not chosen by a DALI reader: an external source hands
the pipeline, batch by batch, the file paths and labels of the batches the loader planned, and ``fn.io.file.read``
reads the files in DALI's threads. The plan is :mod:`data.sampling`'s: each epoch a permutation of the whole
training set drawn from ``(seed, epoch)``, the same on every rank, of which each rank takes a strided shard, so the
ranks' shards are disjoint and every backend reads the same images at the same step. Resuming at ``start_step``
starts the plan at that batch (the same images as the uninterrupted run; DALI's augmentation stream is not
restored, so the crops differ). An epoch left unfinished (a step cap, preemption) is drained before the next one:
the batches DALI had already queued are decoded and dropped (at most ``dali_prefetch``), so no batch of one epoch
leaks into the next.

Validation reads the rank's strided shard; the last batch is simply smaller (the external source gives DALI
batches of any size up to the pipeline's), so every image counts exactly once without padding.

The pipeline is driven with ``Pipeline.run()`` only (not ``schedule_run`` / ``share_outputs`` /
``release_outputs``, the lower-level API); a file DALI cannot decode (corrupt or truncated) surfaces as
:class:`data.folder.DataLoadError` naming the file (the files of the failing batches are re-checked with PIL) and
pointing to ``tools/check_dataset.py``; the broken pipeline is then rebuilt on the next use.

Pipeline: ``dali`` decodes on the GPU ("mixed": nvJPEG, with the hardware decoder taking ``dali_hw_decoder_load``
of the JPEGs), with a fused decode + random-resized crop (ROI decode) for training; resize, flip and normalization
(crop_mirror_normalize) run on the GPU and the output is float32 already in the requested memory format. The
hardware decoder's memory is preallocated for the share of the pipeline's own batch it decodes
(:func:`preallocation`): images of up to ``dali_preallocate_width`` x ``dali_preallocate_height``, scaled down to fit
``dali_preallocate_mib`` per pipeline (larger images grow the buffers when they come); the estimate and the GPU
memory the build actually took are logged when the pipeline is built. ``dali_cpu`` runs the same operators on the
CPU and returns uint8 NHWC; normalization then happens on the device (:class:`data.transforms.Normalizer`), which
moves 4x fewer bytes to the GPU than float32 would.

Evaluation resizes to the sizes that :func:`data.transforms.eval_transform` computes (shorter side
``round(img_size / crop_pct)``, longer side rounded half up) with antialiasing, and crops at the same offset, so
``dali_cpu`` and ``torch`` agree to within resampling differences (tested). EXIF orientation is ignored, as PIL does.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data.base import Batch, TrainLoader, ValLoader, eval_batch_size, feed_device
from data.folder import DataLoadError, FileTable
from data.sampling import dali_seed
from data.transforms import Normalizer, describe_error, eval_resize_size, load_rgb

log = logging.getLogger(__name__)

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


class BatchFeed:
    """The pipeline's external source: the planned batches of (path, label), one per call, then StopIteration.

    Paths go to DALI as the UTF-8 bytes of each path (``fn.io.file.read`` reads them); labels as int32 scalars.
    """

    def __init__(self, files: FileTable):
        self.files = files
        self.batches: list[np.ndarray] = []
        self.next = 0

    def plan(self, batches: list[np.ndarray]) -> None:
        """The batches (arrays of sample indices) of the coming epoch or pass."""
        self.batches, self.next = batches, 0

    def stop(self) -> None:
        """Ends the current plan: the next call raises StopIteration."""
        self.next = len(self.batches)

    def __call__(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if self.next >= len(self.batches):
            raise StopIteration
        indices = self.batches[self.next]
        self.next += 1
        paths = [np.frombuffer(p.encode(), dtype=np.uint8) for p in self.files.paths(indices)]
        return paths, [np.array(label, dtype=np.int32) for label in self.files.labels[indices]]


def preallocation(data_cfg: Any, batch_size: int) -> dict[str, int]:
    """nvJPEG hardware-decoder preallocation for a pipeline of ``batch_size``: the hints and the bytes they reserve.

    The hardware decoder takes ``ceil(dali_hw_decoder_load * batch_size)`` images of each batch and its buffers are
    preallocated for that many RGB images of the hinted size (3 bytes per pixel). The hints are
    ``dali_preallocate_width`` x ``dali_preallocate_height``, scaled down (same aspect) until the total fits
    ``dali_preallocate_mib``; 0 when ``dali_preallocate`` is off.
    """
    images = math.ceil(data_cfg.dali_hw_decoder_load * batch_size)
    width, height = data_cfg.dali_preallocate_width, data_cfg.dali_preallocate_height
    if not data_cfg.dali_preallocate or images == 0 or width * height == 0:
        return {"images": images, "width": 0, "height": 0, "bytes": 0}
    budget = data_cfg.dali_preallocate_mib * 2**20
    shrink = min(1.0, math.sqrt(budget / (images * width * height * 3)))
    width, height = max(1, int(width * shrink)), max(1, int(height * shrink))
    return {"images": images, "width": width, "height": height, "bytes": images * width * height * 3}


def build_pipeline(
    feed: BatchFeed,
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
    what: str = "",
):
    """Builds a DALI pipeline that decodes the batches ``feed`` hands it (see the module docstring).

    Args:
        feed: the external source (the loader plans its batches before each epoch or pass).
        train: random-resized crop + flip (else resize + center crop).
        data_cfg: ``cfg.data``.
        batch_size: the pipeline's (largest) batch size.
        gpu: decode with the "mixed" (GPU) decoder and run the image operators on the GPU.
        device_id: CUDA device (``None`` for a CPU-only pipeline).
        seed: pipeline seed.
        normalize: output normalized float32 (CHW, or HWC when ``channels_last``); else uint8 HWC.
        channels_last: with ``normalize``, emit HWC so that the NCHW view is channels_last.
        prefetch: prefetch queue depth (default ``data_cfg.dali_prefetch``).
        what: a name for the log line (e.g. "train").
    """
    dali = import_dali("dali" if gpu else "dali_cpu")
    fn, dt = dali.fn, dali.types
    size = data_cfg.img_size
    interp = dt.INTERP_CUBIC if data_cfg.interpolation == "bicubic" else dt.INTERP_LINEAR
    decode: dict[str, Any] = {"device": "mixed" if gpu else "cpu", "output_type": dt.RGB, "adjust_orientation": False}
    prealloc = preallocation(data_cfg, batch_size) if gpu else None
    if gpu:
        decode["hw_decoder_load"] = data_cfg.dali_hw_decoder_load
        decode.update(
            device_memory_padding=data_cfg.dali_device_memory_padding,
            host_memory_padding=data_cfg.dali_host_memory_padding,
        )
        if prealloc["bytes"]:
            decode.update(preallocate_width_hint=prealloc["width"], preallocate_height_hint=prealloc["height"])
    pipe = dali.Pipeline(
        batch_size=batch_size,
        num_threads=max(1, data_cfg.workers),
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=prefetch or data_cfg.dali_prefetch,
    )
    with pipe:
        paths, label = fn.external_source(source=feed, num_outputs=2, batch=True, dtype=[dt.UINT8, dt.INT32])
        encoded = fn.io.file.read(paths)
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
    free_before = torch.cuda.mem_get_info(device_id)[0] if gpu else 0
    pipe.build()
    if gpu:
        taken = (free_before - torch.cuda.mem_get_info(device_id)[0]) / 2**20
        log.info(
            "DALI %s pipeline (batch %d): nvJPEG hardware decoder preallocated for %d images of up to %dx%d "
            "(%.0f MiB estimated, budget data.dali_preallocate_mib=%d); building the pipeline took %.0f MiB of "
            "GPU memory.",
            what,
            batch_size,
            prealloc["images"],
            prealloc["width"],
            prealloc["height"],
            prealloc["bytes"] / 2**20,
            data_cfg.dali_preallocate_mib,
            taken,
        )
    return pipe


def _find_unreadable(paths: list[str]) -> list[tuple[str, str]]:
    bad = []
    for path in dict.fromkeys(paths):
        try:
            load_rgb(path)
        except Exception as e:
            bad.append((path, describe_error(e)))
    return bad


@dataclass(frozen=True)
class DaliOutput:
    """Where a DALI loader's pipeline runs and how its batches come out (the same for both splits of a run).

    Attributes:
        gpu: Decode and augment on the GPU (backend ``dali``) or on the CPU (``dali_cpu``).
        device_id: The CUDA device of a GPU pipeline; None for a CPU pipeline.
        normalizer: The run's mean/std, memory format and device (the one batches are delivered to).
        normalize_in_pipeline: Normalize inside the pipeline (float32 out of DALI) or after it on the device
            (uint8 out of DALI); None: inside on the GPU path only.
    """

    gpu: bool
    device_id: int | None
    normalizer: Normalizer
    normalize_in_pipeline: bool | None = None

    @property
    def normalize(self) -> bool:
        """Whether the pipeline normalizes (and so outputs float32)."""
        return self.gpu if self.normalize_in_pipeline is None else self.normalize_in_pipeline

    @property
    def device(self) -> torch.device:
        """The torch device batches are delivered to (the normalizer's)."""
        return self.normalizer.device

    @property
    def channels_last(self) -> bool:
        """Whether batches are delivered channels-last (a normalizing pipeline then outputs NHWC)."""
        return self.normalizer.memory_format == torch.channels_last


class _DaliRunner:
    """One split's pipeline for the whole run: planning, running, draining, output conversion and error reports."""

    def __init__(
        self, files: FileTable, data_cfg: Any, output: DaliOutput, *, train: bool, batch_size: int, seed: int, what: str
    ):
        import_dali("dali" if output.gpu else "dali_cpu")
        self.data_cfg = data_cfg
        self.output = output
        self._feed_ndarray = import_dali().feed_ndarray
        self.feed = BatchFeed(files)
        # How to (re)build this split's pipeline: at construction, and again after a failed iteration.
        self._new_pipeline = functools.partial(
            build_pipeline,
            self.feed,
            train=train,
            data_cfg=data_cfg,
            batch_size=batch_size,
            gpu=output.gpu,
            device_id=output.device_id,
            seed=seed,
            normalize=output.normalize,
            channels_last=output.channels_last,
            what=what,
        )
        self.pipe = None
        self.builds = 0
        self._build()

    def _build(self) -> None:
        self.feed.plan([])
        self.pipe = self._new_pipeline()
        self.builds += 1

    def close(self) -> None:
        self.pipe = None

    def _to_torch(self, tensor_list, dtype: torch.dtype, on_device: bool) -> torch.Tensor:
        dense = tensor_list.as_tensor()
        device = self.output.device
        if on_device:
            out = torch.empty(dense.shape(), dtype=dtype, device=device)
            self._feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        else:
            out = torch.empty(dense.shape(), dtype=dtype, pin_memory=device.type == "cuda")
            self._feed_ndarray(dense, out)
        return out

    def _drain(self) -> None:
        """Ends the plan and consumes what DALI already queued, then resets the pipeline for the next plan."""
        self.feed.stop()
        for _ in range(self.data_cfg.dali_prefetch + 2):
            try:
                self.pipe.run()
            except StopIteration:
                break
        self.pipe.reset()

    def run(self, batches: list[np.ndarray], label: str) -> Iterator[Batch]:
        """Runs the pipeline over ``batches`` (arrays of sample indices) and yields host or device batches."""
        if not batches:
            return
        if self.pipe is None:
            self._build()  # after a failure (or close): the broken pipeline was dropped
        self.feed.plan(batches)
        out = self.output
        dtype = torch.float32 if out.normalize else torch.uint8
        done = False
        try:
            for k, indices in enumerate(batches):
                try:
                    images, labels = self.pipe.run()
                except (RuntimeError, StopIteration) as e:
                    self.pipe = None  # not reusable after a failed iteration
                    raise self._decode_error(e, batches, k, label) from None
                x = self._to_torch(images, dtype, out.gpu)
                y = self._to_torch(labels, torch.int32, False).view(-1)
                assert len(y) == len(indices), "DALI returned a batch of another size than planned"
                del images, labels
                if out.normalize:
                    if out.channels_last:
                        x = x.permute(0, 3, 1, 2)
                    yield x.to(out.device, non_blocking=True), y.to(out.device, non_blocking=True).long()
                else:
                    yield x, y
            done = True
        finally:
            if self.pipe is not None:
                if done:
                    self.feed.stop()
                self._drain()

    def batches(self, batches: list[np.ndarray], label: str) -> Iterator[Batch]:
        """Device batches in the requested memory format."""
        host = self.run(batches, label)
        normalizer = self.output.normalizer
        if self.output.normalize:
            for x, y in host:
                yield normalizer.format(x), y
        else:
            yield from feed_device(host, normalizer, self.output.device)

    def _decode_error(self, err: Exception, batches: list[np.ndarray], k: int, label: str) -> DataLoadError:
        # The failing iteration may be any of those DALI had already queued (prefetch).
        ahead = np.concatenate(batches[k : k + self.data_cfg.dali_prefetch + 1])
        candidates = self.feed.files.paths(ahead)
        bad = _find_unreadable(candidates)
        detail = str(err).strip().splitlines()
        dali_says = next((line for line in reversed(detail) if line.strip() and "no longer valid" not in line), "")
        if bad:
            names = "\n".join(f"  {p} ({e})" for p, e in bad)
            head = f"DALI could not decode an image in {label}, batch {k}. Unreadable files there:\n{names}\n"
        else:
            head = (
                f"The DALI pipeline failed in {label}, batch {k} (files {candidates[0]} ... {candidates[-1]}); "
                f"PIL can read all of those files, so the failure is DALI-specific.\n"
            )
        return DataLoadError(
            f"{head}DALI said: {dali_says or type(err).__name__}\nRun `python tools/check_dataset.py "
            f"{os.path.dirname(self.feed.files.root)}` to list every unreadable file, then fix or remove them; "
            f"data.backend=torch skips unreadable files."
        )


class _DaliLoader:
    """What the two DALI loaders share: their :class:`_DaliRunner` (one pipeline, built at construction)."""

    _runner: _DaliRunner

    @property
    def pipeline_builds(self) -> int:
        """How many times the pipeline was built (1 for a healthy run)."""
        return self._runner.builds

    def close(self) -> None:
        self._runner.close()


class DaliTrainLoader(_DaliLoader, TrainLoader):
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
        output: DaliOutput,
    ):
        super().__init__(
            len(files), batch_size=data_cfg.batch_size, seed=seed, rank=rank, world_size=world_size, steps=steps
        )
        self._runner = _DaliRunner(
            files, data_cfg, output, train=True, batch_size=self.batch_size, seed=dali_seed(seed, rank, 0),
            what=f"train (rank {rank})",
        )  # fmt: skip

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        self._check_start(start_step)
        batches = list(self.batch_indices(epoch)[start_step:])
        yield from self._runner.batches(batches, f"epoch {epoch} (rank {self.rank})")


class DaliValLoader(_DaliLoader, ValLoader):
    """Validation loader of the ``dali`` / ``dali_cpu`` backends (see the module docstring)."""

    def __init__(
        self,
        files: FileTable,
        data_cfg: Any,
        *,
        rank: int,
        world_size: int,
        output: DaliOutput,
    ):
        super().__init__(len(files), batch_size=eval_batch_size(data_cfg), rank=rank, world_size=world_size)
        self._runner = _DaliRunner(
            files, data_cfg, output, train=False, batch_size=self.batch_size, seed=0, what=f"validation (rank {rank})"
        )

    def __iter__(self) -> Iterator[Batch]:
        yield from self._runner.batches(self.batches(), f"validation (rank {self.rank})")
