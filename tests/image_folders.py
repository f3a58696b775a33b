"""Test fixtures: tiny ImageNet-layout datasets of JPEG files, and damaged images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def smooth_image(rng: np.random.Generator, width: int, height: int, cells: int = 6) -> Image.Image:
    """A random RGB image of smooth color blobs plus a little noise (natural-looking enough for JPEG tests)."""
    coarse = rng.integers(0, 256, (max(2, height // cells), max(2, width // cells), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_image_folder(
    root: str | Path,
    classes: Sequence[str] = ("cat", "dog", "owl"),
    train_per_class: int = 4,
    val_per_class: int = 3,
    size: tuple[int, int] = (40, 30),
    seed: int = 0,
    quality: int = 92,
    ext: str = ".JPEG",
) -> Path:
    """Writes ``root/{train,val}/<class>/<class>_<i><ext>`` JPEGs and returns ``root``.

    Args:
        root: dataset root (created).
        classes: class folder names.
        train_per_class: training images per class (an int, or one per class via a sequence).
        val_per_class: validation images per class (int or sequence).
        size: image size ``(width, height)``; every other image is transposed to ``(height, width)``.
        seed: content seed.
        quality: JPEG quality.
        ext: file extension (case is kept, so ``.jpg``/``.JPEG`` can both be tested).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        counts = [per_class] * len(classes) if isinstance(per_class, int) else list(per_class)
        for name, count in zip(classes, counts):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w, h = size if i % 2 == 0 else (size[1], size[0])
                smooth_image(rng, w, h).save(folder / f"{name}_{i}{ext}", quality=quality)
    return root


def corrupt_file(path: str | Path, mode: str = "garbage") -> Path:
    """Damages an image file: ``garbage`` (not an image at all) or ``truncate`` (cut to a third)."""
    path = Path(path)
    if mode == "garbage":
        path.write_bytes(b"this is not an image\n" * 10)
    elif mode == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return path
