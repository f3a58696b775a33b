"""Image transforms of the recipe (``docs/AN.md`` 4.1, 4.3) on PIL images, and the on-device normalization.

Train: random-resized crop (Inception-style: area fraction in ``scale``, log-uniform aspect ratio in
``ratio``, 10 attempts, then a centered crop with the ratio clamped) resized to ``img_size`` with
bilinear or bicubic interpolation, then a horizontal flip with probability ``hflip``. No color jitter.
Randomness comes from a ``random.Random`` seeded per sample (see :mod:`data.sampling`).

Eval: resize so that the shorter side is ``round(img_size / crop_pct)`` (256 for 224 / 0.875), the
longer side ``round(long * short_new / short)``, then a centered ``img_size`` crop whose offset is
``round((size - img_size) / 2)`` rounding halves up. These rounding rules are the ones the DALI
pipeline computes too (:mod:`data.dali`), so both backends crop the same pixels.

Images stay uint8 (HWC) on the CPU; :class:`Normalizer` turns a uint8 NHWC batch into a normalized
float32 NCHW (or channels_last) batch on the device.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def load_rgb(path: str) -> Image.Image:
    """Opens and fully decodes an image as RGB; raises on corrupt, truncated or non-image files."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def describe_error(err: BaseException) -> str:
    """A one-line description of a decoding error, for logs and reports."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first}"[:200]


def resample_filter(interpolation: str) -> Image.Resampling:
    """The PIL filter for ``bilinear`` or ``bicubic``."""
    try:
        return _RESAMPLE[interpolation]
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}") from None


def round_half_up(x: float) -> int:
    """Rounds to the nearest integer, halves up (unlike Python's round, which rounds halves to even)."""
    return math.floor(x + 0.5)


def eval_resize_size(img_size: int, crop_pct: float) -> int:
    """Shorter side before the center crop: ``round(img_size / crop_pct)``."""
    return round_half_up(img_size / crop_pct)


def random_resized_crop_box(
    rng: random.Random, width: int, height: int, scale: Sequence[float], ratio: Sequence[float], attempts: int = 10
) -> tuple[int, int, int, int]:
    """Draws an Inception-style crop window.

    Args:
        rng: the sample's random generator (only ``rng.random()`` is used).
        width: image width.
        height: image height.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height), sampled log-uniformly.
        attempts: tries before falling back to a centered crop.

    Returns:
        ``(left, top, crop_width, crop_height)``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * (scale[0] + (scale[1] - scale[0]) * rng.random())
        aspect = math.exp(log_lo + (log_hi - log_lo) * rng.random())
        w = round_half_up(math.sqrt(target * aspect))
        h = round_half_up(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = min(int(rng.random() * (width - w + 1)), width - w)
            top = min(int(rng.random() * (height - h + 1)), height - h)
            return left, top, w, h
    # Fallback: the whole image, cut to the nearest allowed aspect ratio, centered.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, max(1, min(height, round_half_up(width / ratio[0])))
    elif in_ratio > ratio[1]:
        w, h = max(1, min(width, round_half_up(height * ratio[1]))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_transform(
    img: Image.Image,
    rng: random.Random,
    img_size: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    hflip: float,
    interpolation: str,
) -> np.ndarray:
    """Random-resized crop + flip of an RGB PIL image; returns uint8 HWC ``(img_size, img_size, 3)``."""
    left, top, w, h = random_resized_crop_box(rng, img.width, img.height, scale, ratio)
    out = img.resize((img_size, img_size), resample_filter(interpolation), box=(left, top, left + w, top + h))
    if rng.random() < hflip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def eval_transform(img: Image.Image, img_size: int, crop_pct: float, interpolation: str) -> np.ndarray:
    """Resize-shorter-side + center crop of an RGB PIL image; returns uint8 HWC ``(img_size, img_size, 3)``."""
    size = eval_resize_size(img_size, crop_pct)
    width, height = img.size
    short = min(width, height)
    new_w = round_half_up(width * size / short)
    new_h = round_half_up(height * size / short)
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), resample_filter(interpolation))
    left = round_half_up((new_w - img_size) / 2)
    top = round_half_up((new_h - img_size) / 2)
    return np.asarray(img.crop((left, top, left + img_size, top + img_size)), dtype=np.uint8)


class Normalizer:
    """Moves uint8 NHWC batches to the device and normalizes them there.

    The float conversion happens on the device (4x less host-to-device traffic than float32). An NHWC
    buffer seen as NCHW is already channels_last, so channels_last output costs no transpose; for
    contiguous NCHW output the transpose is done on uint8 before the conversion.

    Args:
        mean: per-channel mean in [0, 1] units.
        std: per-channel standard deviation in [0, 1] units.
        device: target device.
        memory_format: ``torch.contiguous_format`` or ``torch.channels_last``.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        if memory_format not in (torch.contiguous_format, torch.channels_last):
            raise ValueError(f"memory_format must be contiguous_format or channels_last, got {memory_format}")
        self.device = torch.device(device)
        self.memory_format = memory_format
        self.mean = torch.tensor([255.0 * m for m in mean], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.inv_std = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=self.device)
        self.inv_std = self.inv_std.view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images``: uint8 (N, H, W, 3) on any device; ``labels``: integer (N,). Returns device tensors."""
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        if self.memory_format == torch.contiguous_format:
            x = x.contiguous()
        x = x.float().sub_(self.mean).mul_(self.inv_std)
        if self.memory_format == torch.channels_last and not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # only for degenerate shapes (H = W = 1)
        y = labels.to(self.device, non_blocking=True).long()
        return x, y

    def format(self, images: torch.Tensor) -> torch.Tensor:
        """Puts an already normalized float batch (NCHW logical shape) in this normalizer's memory format."""
        return images.contiguous(memory_format=self.memory_format)
